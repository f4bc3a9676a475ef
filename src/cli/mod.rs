//! The `pipeline` command line: argument structs, commands and printing
//! (the libraries have no CLI).

pub mod inspect;
pub mod model;
pub mod report_compare;
