//! Background maintenance of partitions: retention (age, size, "all groups acked") and key
//! compaction. Planning is pure ([`retention::plan`]); the runner applies plans to the logs.

pub mod retention;
