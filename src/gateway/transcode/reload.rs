//! The protos compiled again when they change: [`Transcoder::follow`] (called on the
//! gateway's file-watch tick) compares the modification times of the files last loaded
//! (the `protos`, the files of their import folders that were loaded, or the
//! `descriptor_set`) and, when one changed, loads them again and swaps the compiled state
//! in. A reload that fails keeps the last good protos and is logged once (until it fails
//! differently or succeeds).

use super::{Compiled, TranscodeError, Transcoder};
use crate::config::TranscodingConfig;
use prost_reflect::DescriptorPool;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

/// The files followed and what is known of them.
pub struct Watch {
    /// The files the compiled state came from.
    files: Vec<PathBuf>,
    /// Their modification times when last looked at.
    seen: Vec<Option<SystemTime>>,
    /// The last failed reload's message, so it is logged once.
    failed: Option<String>,
}

impl Watch {
    pub fn new(config: &TranscodingConfig, pool: &DescriptorPool) -> Watch {
        let files = files(config, pool);
        Watch {
            seen: modified(&files),
            files,
            failed: None,
        }
    }
}

fn modified(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
    files
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// Where the protos' imports are looked up: `import_paths`, else the protos' folders
/// (as [`TranscodingConfig::descriptors`] does).
fn include_dirs(config: &TranscodingConfig) -> Vec<PathBuf> {
    if !config.import_paths.is_empty() {
        return config.import_paths.clone();
    }
    let mut dirs = Vec::new();
    for p in &config.protos {
        let dir = p.parent().map_or_else(|| PathBuf::from("."), PathBuf::from);
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs
}

/// The files a compiled state came from: the descriptor set, or the protos and each file
/// of the pool found in an import folder (protox's own google/protobuf files are not on
/// disk and are not followed).
pub fn files(config: &TranscodingConfig, pool: &DescriptorPool) -> Vec<PathBuf> {
    if let Some(set) = &config.descriptor_set {
        return vec![set.clone()];
    }
    let dirs = include_dirs(config);
    let mut out = config.protos.clone();
    for file in pool.files() {
        let found = dirs
            .iter()
            .map(|d| d.join(file.name()))
            .find(|p| p.is_file());
        if let Some(path) = found {
            if !out.iter().any(|p| same_file(p, &path)) {
                out.push(path);
            }
        }
    }
    out
}

fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    a == b
        || matches!(
            (a.canonicalize(), b.canonicalize()),
            (Ok(x), Ok(y)) if x == y
        )
}

impl Transcoder {
    /// The files the current protos came from.
    #[cfg(test)]
    pub fn files(&self) -> Vec<PathBuf> {
        self.watch().files.clone()
    }

    /// Loads the protos again and swaps them in; on error the last good ones stay.
    pub fn reload(&self) -> Result<(), TranscodeError> {
        let compiled = Compiled::load(&self.config)?;
        let mut watch = self.watch();
        watch.files = files(&self.config, &compiled.pool);
        watch.seen = modified(&watch.files);
        self.compiled.store(Arc::new(compiled));
        Ok(())
    }

    /// Reloads when a file changed since the last look (see the module docs).
    pub fn follow(&self) {
        let now = {
            let mut watch = self.watch();
            let now = modified(&watch.files);
            if now == watch.seen {
                return;
            }
            watch.seen = now.clone();
            now
        };
        match self.reload() {
            Ok(()) => {
                self.watch().failed = None;
                tracing::info!("gateway.transcoding: protos reloaded");
            }
            Err(e) => {
                let mut watch = self.watch();
                // A later look sees the same times: nothing more to do until they change.
                watch.seen = now;
                let message = e.to_string();
                if watch.failed.as_deref() != Some(message.as_str()) {
                    tracing::warn!("{message}; keeping the last good protos");
                    watch.failed = Some(message);
                }
            }
        }
    }

    fn watch(&self) -> std::sync::MutexGuard<'_, Watch> {
        self.watch.lock().unwrap_or_else(|p| p.into_inner())
    }
}
