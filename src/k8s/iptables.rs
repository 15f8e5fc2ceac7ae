//! `meshd iptables {install,uninstall,print}`: the pod's interception rules, run by the
//! init container before the app starts (or by hand in a network namespace).
//!
//! Flow: the command line becomes [`Rules`]; [`Rules::script`] is a plain function that
//! renders them as `iptables-restore` input, and `print` shows exactly that. `install`
//! first removes any earlier meshd rules (so it can run twice), then loads the script with
//! `iptables-restore --noflush`, which applies it at once or not at all. `uninstall`
//! removes the jumps and the `MESHD_*` chains and checks that none is left.
//!
//! What the rules do, in the `nat` table of iptables and (when the pod has IPv6, or with
//! `--ipv6 true`) of ip6tables:
//! - every TCP connection the pod opens goes to `MESHD_OUTPUT`, which lets through the
//!   sidecar's own connections (by its uid, and gid when given: without this they would
//!   loop back into it), loopback destinations (the app's calls to the sidecar's explicit
//!   listeners and admin), excluded ports and networks, and REDIRECTs the rest to the
//!   transparent listener (`--outbound-port`, 15001), which reads the original destination;
//! - TCP arriving for one of `--inbound-ports` (the app's own ports) is REDIRECTed to the
//!   mTLS inbound (`--inbound-port`, 15006), so a plaintext client that finds the app's
//!   port meets the mTLS listener instead. By default no inbound port is redirected:
//!   peers dial 15006 and the app listens on loopback.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// IPv4 (`iptables`) or IPv6 (`ip6tables`): the same rules are installed for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn program(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

/// Whether this network namespace has IPv6 (the kernel lists its addresses).
pub fn ipv6_enabled() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// The chains meshd owns; nothing else in the table is touched.
const CHAINS: [&str; 3] = ["MESHD_OUTPUT", "MESHD_REDIRECT", "MESHD_INBOUND"];

/// The jumps from the built-in chains into ours, as `iptables -t nat` arguments.
const JUMPS: [[&str; 5]; 2] = [
    ["OUTPUT", "-p", "tcp", "-j", "MESHD_OUTPUT"],
    ["PREROUTING", "-p", "tcp", "-j", "MESHD_INBOUND"],
];

/// Why the rules could not be put in place or taken out.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// The iptables program could not be started (not installed, not on PATH).
    #[error("cannot run `{program}`: {error} (is the iptables package installed?)")]
    Spawn {
        program: &'static str,
        error: std::io::Error,
    },
    /// iptables ran and refused (no CAP_NET_ADMIN, a missing kernel module, a bad rule).
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// `uninstall` ran, yet meshd chains are still in the table.
    #[error("meshd rules are still in the nat table after uninstall:\n{0}")]
    Leftover(String),
    /// A `--exclude-outbound-cidrs` value is not an address or an address/prefix.
    #[error("`{0}` is not a network such as 10.0.0.0/8 or fd00::/8")]
    BadNetwork(String),
    /// A network's prefix length is longer than its address (32 bits, or 128).
    #[error("`{text}`: the prefix length must be 0 to {max}")]
    BadPrefix { text: String, max: u8 },
}

/// A network in CIDR notation, IPv4 (`10.0.0.0/8`) or IPv6 (`fd00::/8`); a bare address
/// is one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::str::FromStr for IpNet {
    type Err = IptablesError;
    fn from_str(s: &str) -> Result<Self, IptablesError> {
        let bad = || IptablesError::BadNetwork(s.to_string());
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| {
                IptablesError::BadPrefix {
                    text: s.to_string(),
                    max,
                }
            })?,
        };
        Ok(IpNet { addr, prefix })
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The interception rules of one pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// The uid meshd runs as: its own connections are never redirected.
    pub proxy_uid: u32,
    /// The gid meshd runs as, also let through when given.
    pub proxy_gid: Option<u32>,
    /// The transparent listener's port (`transparent.listen`).
    pub outbound_port: u16,
    /// The mTLS inbound's port (`inbound.listen`).
    pub inbound_port: u16,
    /// Ports whose incoming TCP is redirected to the inbound.
    pub inbound_ports: Vec<u16>,
    /// Destination ports the app reaches directly.
    pub exclude_outbound_ports: Vec<u16>,
    /// Destination networks the app reaches directly (each in its family's rules).
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// Whether the IPv6 rules are installed too.
    pub ipv6: bool,
}

impl Rules {
    /// The families these rules are installed for.
    pub fn families(&self) -> Vec<Family> {
        let mut f = vec![Family::V4];
        if self.ipv6 {
            f.push(Family::V6);
        }
        f
    }

    /// The rules of one family as `iptables-restore --noflush` input for the `nat` table.
    pub fn script(&self, family: Family) -> String {
        let mut s = String::from("*nat\n");
        for chain in CHAINS {
            let _ = writeln!(s, ":{chain} - [0:0]");
        }
        let _ = writeln!(
            s,
            "-A MESHD_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        );
        let _ = writeln!(
            s,
            "-A MESHD_OUTPUT -m owner --uid-owner {} -j RETURN",
            self.proxy_uid
        );
        if let Some(gid) = self.proxy_gid {
            let _ = writeln!(s, "-A MESHD_OUTPUT -m owner --gid-owner {gid} -j RETURN");
        }
        let _ = writeln!(s, "-A MESHD_OUTPUT -d {} -j RETURN", family.loopback());
        s.push_str("-A MESHD_OUTPUT -o lo -j RETURN\n");
        for port in &self.exclude_outbound_ports {
            let _ = writeln!(s, "-A MESHD_OUTPUT -p tcp --dport {port} -j RETURN");
        }
        for net in &self.exclude_outbound_cidrs {
            if Family::of(net.addr) == family {
                let _ = writeln!(s, "-A MESHD_OUTPUT -d {net} -j RETURN");
            }
        }
        s.push_str("-A MESHD_OUTPUT -j MESHD_REDIRECT\n");
        for port in &self.inbound_ports {
            let _ = writeln!(
                s,
                "-A MESHD_INBOUND -p tcp --dport {port} -j REDIRECT --to-ports {}",
                self.inbound_port
            );
        }
        for jump in JUMPS {
            let _ = writeln!(s, "-A {}", jump.join(" "));
        }
        s.push_str("COMMIT\n");
        s
    }

    /// Every family's script, each under a comment naming the command that loads it.
    pub fn print(&self) -> String {
        self.families()
            .into_iter()
            .map(|f| format!("# {} --noflush\n{}", f.restore(), self.script(f)))
            .collect::<Vec<_>>()
            .join("")
    }

    /// Removes earlier meshd rules, then loads these, one `iptables-restore` (and one
    /// `ip6tables-restore`) each, which applies all of it or nothing.
    pub fn install(&self) -> Result<(), IptablesError> {
        for family in self.families() {
            uninstall(family)?;
            self.restore(family)?;
        }
        Ok(())
    }

    fn restore(&self, family: Family) -> Result<(), IptablesError> {
        let program = family.restore();
        let mut child = Command::new(program)
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| IptablesError::Spawn { program, error })?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(self.script(family).as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|error| IptablesError::Spawn { program, error })?;
        succeeded(format!("{program} --noflush"), &out)
    }
}

/// `meshd iptables ...`
#[derive(Debug, clap::Subcommand)]
pub enum IptablesCommand {
    /// Replace any meshd rules with these (needs CAP_NET_ADMIN; the init container's job).
    Install(RuleArgs),
    /// Remove every meshd rule and chain.
    Uninstall,
    /// Print the rules as iptables-restore input, changing nothing.
    Print(RuleArgs),
}

/// The options of `install` and `print`.
#[derive(Debug, clap::Args)]
pub struct RuleArgs {
    /// The uid meshd runs as; its own connections are not redirected.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// The gid meshd runs as, also not redirected.
    #[arg(long)]
    pub proxy_gid: Option<u32>,
    /// Port of the transparent outbound listener.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// Port of the mTLS inbound listener.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// Ports (comma-separated) whose incoming TCP goes to the inbound listener.
    #[arg(long, value_delimiter = ',')]
    pub inbound_ports: Vec<u16>,
    /// Destination ports (comma-separated) the app reaches without the sidecar.
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Destination networks (comma-separated CIDRs, IPv4 or IPv6) the app reaches without
    /// the sidecar.
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// Install the IPv6 rules too (default: when the pod has IPv6).
    #[arg(long, default_value_t = ipv6_enabled(), action = clap::ArgAction::Set)]
    pub ipv6: bool,
}

impl From<RuleArgs> for Rules {
    fn from(a: RuleArgs) -> Rules {
        Rules {
            proxy_uid: a.proxy_uid,
            proxy_gid: a.proxy_gid,
            outbound_port: a.outbound_port,
            inbound_port: a.inbound_port,
            inbound_ports: a.inbound_ports,
            exclude_outbound_ports: a.exclude_outbound_ports,
            exclude_outbound_cidrs: a.exclude_outbound_cidrs,
            ipv6: a.ipv6,
        }
    }
}

/// Carries out one `meshd iptables` command; returns what to print.
pub fn iptables_main(command: IptablesCommand) -> Result<String, IptablesError> {
    match command {
        IptablesCommand::Print(args) => Ok(Rules::from(args).print()),
        IptablesCommand::Install(args) => {
            let rules = Rules::from(args);
            rules.install()?;
            Ok(format!("meshd iptables: installed\n{}", rules.print()))
        }
        IptablesCommand::Uninstall => {
            uninstall(Family::V4)?;
            if ipv6_enabled() {
                uninstall(Family::V6)?;
            }
            Ok("meshd iptables: no meshd rules left".into())
        }
    }
}

/// Runs `iptables -t nat ARGS` (or ip6tables); `Ok(false)` when it refused (the rule or
/// chain is not there), an error when it could not run at all.
fn nat(family: Family, args: &[&str]) -> Result<bool, IptablesError> {
    let program = family.program();
    let status = Command::new(program)
        .args(["-w", "-t", "nat"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|error| IptablesError::Spawn { program, error })?;
    Ok(status.success())
}

/// `Ok` when the command that gave `out` succeeded, else its status and stderr.
fn succeeded(command: String, out: &std::process::Output) -> Result<(), IptablesError> {
    if out.status.success() {
        return Ok(());
    }
    Err(IptablesError::Failed {
        command,
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// The meshd lines of `iptables -t nat -S` (or ip6tables).
fn listed(family: Family) -> Result<String, IptablesError> {
    let program = family.program();
    let out = Command::new(program)
        .args(["-w", "-t", "nat", "-S"])
        .output()
        .map_err(|error| IptablesError::Spawn { program, error })?;
    succeeded(format!("{program} -t nat -S"), &out)?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("MESHD_"))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Takes out every jump to a meshd chain and the chains themselves; a rule or chain that
/// is not there is fine. Fails if anything of meshd's is left.
pub fn uninstall(family: Family) -> Result<(), IptablesError> {
    for jump in JUMPS {
        let mut args = vec!["-D"];
        args.extend(jump);
        // The same jump may have been added more than once by hand.
        for _ in 0..16 {
            if !nat(family, &args)? {
                break;
            }
        }
    }
    for chain in CHAINS {
        nat(family, &["-F", chain])?;
    }
    for chain in CHAINS {
        nat(family, &["-X", chain])?;
    }
    match listed(family)? {
        left if left.is_empty() => Ok(()),
        left => Err(IptablesError::Leftover(left)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            proxy_uid: 1337,
            proxy_gid: None,
            outbound_port: 15001,
            inbound_port: 15006,
            inbound_ports: vec![],
            exclude_outbound_ports: vec![],
            exclude_outbound_cidrs: vec![],
            ipv6: false,
        }
    }

    /// The defaults: the sidecar's uid and loopback go direct, all other outbound TCP is
    /// redirected to 15001, nothing inbound is redirected.
    #[test]
    fn the_default_rules_redirect_outbound_only() {
        let want = "\
*nat
:MESHD_OUTPUT - [0:0]
:MESHD_REDIRECT - [0:0]
:MESHD_INBOUND - [0:0]
-A MESHD_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A MESHD_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A MESHD_OUTPUT -d 127.0.0.0/8 -j RETURN
-A MESHD_OUTPUT -o lo -j RETURN
-A MESHD_OUTPUT -j MESHD_REDIRECT
-A OUTPUT -p tcp -j MESHD_OUTPUT
-A PREROUTING -p tcp -j MESHD_INBOUND
COMMIT
";
        assert_eq!(rules().script(Family::V4), want);
        let v6 = rules().script(Family::V6);
        assert_eq!(v6, want.replace("127.0.0.0/8", "::1/128"));
        assert_eq!(
            rules().print(),
            format!("# iptables-restore --noflush\n{want}")
        );
        let both = Rules {
            ipv6: true,
            ..rules()
        }
        .print();
        assert!(
            both.ends_with(&format!("# ip6tables-restore --noflush\n{v6}")),
            "{both}"
        );
    }

    /// Each option adds its own line, and the exclusions come before the redirect.
    #[test]
    fn options_add_their_lines_before_the_redirect() {
        let r = Rules {
            proxy_gid: Some(1338),
            outbound_port: 16001,
            inbound_ports: vec![8081, 9090],
            exclude_outbound_ports: vec![22],
            exclude_outbound_cidrs: vec![
                "10.0.0.0/8".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ],
            ..rules()
        };
        let s = r.script(Family::V4);
        assert!(
            !s.contains("fd00::/8"),
            "an IPv6 network in the IPv4 rules:\n{s}"
        );
        let v6 = r.script(Family::V6);
        assert!(
            v6.contains("-A MESHD_OUTPUT -d fd00::/8 -j RETURN") && !v6.contains("10.0.0.0/8"),
            "{v6}"
        );
        let redirect = s.find("-A MESHD_OUTPUT -j MESHD_REDIRECT").unwrap();
        for line in [
            "-A MESHD_OUTPUT -m owner --gid-owner 1338 -j RETURN",
            "-A MESHD_OUTPUT -p tcp --dport 22 -j RETURN",
            "-A MESHD_OUTPUT -d 10.0.0.0/8 -j RETURN",
        ] {
            let at = s
                .find(line)
                .unwrap_or_else(|| panic!("{line} missing:\n{s}"));
            assert!(at < redirect, "{line} after the redirect:\n{s}");
        }
        for line in [
            "-A MESHD_REDIRECT -p tcp -j REDIRECT --to-ports 16001",
            "-A MESHD_INBOUND -p tcp --dport 8081 -j REDIRECT --to-ports 15006",
            "-A MESHD_INBOUND -p tcp --dport 9090 -j REDIRECT --to-ports 15006",
        ] {
            assert!(s.contains(line), "{line} missing:\n{s}");
        }
    }

    #[test]
    fn networks_parse_or_name_the_bad_value() {
        let ok = [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("192.168.1.7", "192.168.1.7/32"),
            ("fd00::/8", "fd00::/8"),
            ("::1", "::1/128"),
        ];
        for (text, shown) in ok {
            assert_eq!(text.parse::<IpNet>().unwrap().to_string(), shown);
        }
        for bad in ["10.0.0.0/33", "fd00::/129", "ten/8", "10.0.0.0/x", ""] {
            let e = bad.parse::<IpNet>().unwrap_err().to_string();
            assert!(e.contains(&format!("`{bad}`")), "{bad}: {e}");
        }
    }
}
