use clap::Parser;
use tracing_subscriber::EnvFilter;

// Every delivery allocates (frames, queue entries) on both worker threads. With mimalloc the
// postgres_changes fan-out (500 subscribers x 500 commits/s) kept up at 238-262k msgs/s
// where glibc's malloc managed 116-164k in the same minutes (BENCHMARKS.md, "Reconnect
// storm: mimalloc and a work gate"); the reconnect storm itself was not measurably changed.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    walcast_server::env_compat::apply();
    let cli = walcast_server::cli::Cli::parse();
    // Logs go to stderr: `walcast tail` owns stdout.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // `tail` is one pipeline (socket reader → decoder → stdout): on one thread its stages
    // hand messages over without cross-thread wake-ups, leaving the other core to the
    // walsender, which is what bounds the drain rate.
    let mut builder = match cli.command {
        walcast_server::cli::Command::Tail(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("walcast: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(walcast_server::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line that says what went wrong and, for known problems, what to do.
            eprintln!("walcast: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
