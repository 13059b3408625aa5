//! Benchmark harness (see BENCHMARKS.md). Placeholder until the harness lands.

fn main() {
    println!("benchmark harness not written yet");
}
