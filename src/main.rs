use std::process::ExitCode;

use clap::Parser;
use wsticket::config::{Cli, Command, Config};
use wsticket::{demo, logging, server, store};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("wsticket: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve(args) => {
            let config = match Config::from_args(*args) {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("wsticket: {err}");
                    return ExitCode::from(2);
                }
            };
            logging::init(config.log_format);
            let result = runtime.block_on(async {
                let listeners = server::bind(&config).await?;
                server::serve(config, listeners, server::shutdown_signal()).await
            });
            if let Err(err) = result {
                tracing::error!(event = "start_failed", error = %err, "wsticket could not start");
                eprintln!("wsticket: {err}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Command::Demo(args) => runtime.block_on(demo::run(args)),
        Command::Store(command) => match store::cli::run(command) {
            Ok(report) => {
                println!("{report}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("wsticket: {err}");
                ExitCode::FAILURE
            }
        },
    }
}
