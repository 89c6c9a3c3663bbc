//! Block devices (placeholder while the trait is written).
pub mod claim;
pub mod discover;
