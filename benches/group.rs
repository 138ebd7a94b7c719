//! Ack tracking in-process: lease + ack pairs per second on one core, and the state size of
//! a million acks around one unacked straggler.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use qit::broker::Ordering;
use qit::group::{Candidate, GroupConfig, GroupState};

fn config() -> GroupConfig {
    GroupConfig {
        max_deliveries: 5,
        backoff_secs: vec![],
        max_in_flight: 1_000_000,
        ordering: Ordering::None,
    }
}

fn lease_and_ack(c: &mut Criterion) {
    let mut group = c.benchmark_group("group");
    const N: u64 = 1_000;
    group.throughput(Throughput::Elements(N));
    let mut state = GroupState::new(config(), &[0]);
    let mut next = 0u64;
    group.bench_function("lease_then_ack_batches_of_1000", |b| {
        b.iter(|| {
            let fresh: Vec<Candidate> = (next..next + N)
                .map(|offset| Candidate { offset, key: None })
                .collect();
            let (grants, _) = state.lease(0, 0, 30_000, N as usize, &fresh).unwrap();
            for g in &grants {
                state.ack(0, g.offset).unwrap();
            }
            next += N;
        })
    });
    group.finish();
    let mut state = GroupState::new(config(), &[0]);
    let fresh: Vec<Candidate> = (0..1_000_001)
        .map(|offset| Candidate { offset, key: None })
        .collect();
    state.lease(0, 0, 30_000, fresh.len(), &fresh).unwrap();
    for offset in 1..1_000_001 {
        state.ack(0, offset).unwrap();
    }
    println!(
        "1,000,000 acked around one straggler: ~{} bytes of state, snapshot {} bytes",
        state.approx_bytes(),
        state.snapshot().encode().len()
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = lease_and_ack
}
criterion_main!(benches);
