//! Authorization policy (placeholder; see issue 4).
