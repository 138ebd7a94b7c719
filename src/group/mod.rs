//! Consumer-group delivery state (pure state machine) and its durable journal.
