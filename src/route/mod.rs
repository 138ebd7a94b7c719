//! Exchange routing rules: direct, fanout, topic and headers matching.
