// rust_threads.rs: Rust std::thread workers fed through std::sync::mpsc channels.
//
// Exercises: a Rust binary (its runtime, allocator use, stdout's LineWriter, which writes each line
// as it is printed), threads blocked in channel receives (futex waits) at the checkpoint, and joins.
// Main sends each of 4 workers its own job channel; results come back on one shared channel in any
// order and are put into per-job slots, then folded in job order, so the output does not depend on
// scheduling. Each round's jobs are derived from the previous round's checksum.
//
// build: rustc -O -o rust_threads rust_threads.rs
// usage: rust_threads [ROUNDS]   (default 200)
// exit:  0
use std::sync::mpsc;
use std::thread;

const WORKERS: usize = 4;
const JOBS: usize = 256;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

// The work for one job: a vector built and reduced, its length varying with the input.
fn work(x: u64) -> u64 {
    let n = 2000 + (x % 4000) as usize;
    let mut v: Vec<u64> = (0..n as u64).map(|i| mix(x ^ i)).collect();
    for _ in 0..3 {
        for i in 1..v.len() {
            v[i] = mix(v[i] ^ v[i - 1]);
        }
    }
    v.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

fn main() {
    let rounds: usize = std::env::args().nth(1).map_or(200, |s| s.parse().expect("ROUNDS must be a number"));
    let every = (rounds / 40).max(1);

    let (result_tx, result_rx) = mpsc::channel::<(usize, u64)>();
    let mut job_txs = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..WORKERS {
        let (job_tx, job_rx) = mpsc::channel::<(usize, u64)>();
        let result_tx = result_tx.clone();
        handles.push(thread::spawn(move || {
            let mut done = 0u64;
            for (slot, input) in job_rx {
                result_tx.send((slot, work(input))).unwrap();
                done += 1;
            }
            done
        }));
        job_txs.push(job_tx);
    }
    drop(result_tx);

    let mut checksum: u64 = 0x5eed;
    let mut results = vec![0u64; JOBS];
    for round in 1..=rounds {
        for slot in 0..JOBS {
            // Uneven input: some workers get more expensive jobs and finish later.
            job_txs[slot % WORKERS].send((slot, mix(checksum.wrapping_add(slot as u64)))).unwrap();
        }
        for _ in 0..JOBS {
            let (slot, r) = result_rx.recv().unwrap();
            results[slot] = r;
        }
        for r in &results {
            checksum = mix(checksum ^ r);
        }
        if round % every == 0 {
            println!("round {}/{} checksum {:016x}", round, rounds, checksum);
        }
    }

    drop(job_txs);
    let jobs: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    println!("workers did {} jobs", jobs);
    println!("done: {} rounds, checksum {:016x}", rounds, checksum);
}
