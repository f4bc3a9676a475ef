//! stage kinds
