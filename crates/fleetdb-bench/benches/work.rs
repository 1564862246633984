//! `cargo bench -p fleetdb-bench --bench work`: the `work` benchmarks with their default arguments
//! (one-at-a-time 8 × 8 for 10 s, burn-down of 50,000, 10,000 sessions for 30 s; SQLite and
//! PostgreSQL). Same code as `fleetdb-bench work`.
//!
//! Only runs under `cargo bench` (which passes `--bench`); `cargo test --benches` merely checks
//! that it builds and starts.

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("work: skipped (not run by `cargo bench`)");
        return;
    }
    let code = fleetdb_bench::work::run_work_main(fleetdb_bench::work::WorkArgs::default());
    std::process::exit(code);
}
