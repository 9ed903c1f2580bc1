//! `omrig`: the multi-node rig from the shell.
//!
//! ```sh
//! omrig run --nodes 3 --omd -- ./my-test.sh   # rig up, omd on every node, script, rig down
//! # inside the script (OMRIG_ID is set):
//! omrig exec 1 -- ip addr            # run a command in node 1
//! omrig addr 2                       # 10.77.0.3
//! omrig omd stop 0; omrig omd start 0
//! ```

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use om_rig::{Rig, RigError};

/// om's multi-node test rig: nodes as network namespaces on one bridge (node i is 10.77.0.(i+1)).
/// Needs root.
#[derive(Debug, Parser)]
#[command(name = "omrig", version)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Bring a rig up, run CMD with OMRIG_ID set, tear the rig down, exit with CMD's status.
    Run {
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Start omd on every node first.
        #[arg(long)]
        omd: bool,
        /// The command (runs in the root namespace; use `omrig exec` inside it).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<OsString>,
    },
    /// Run CMD inside node NODE (replaces omrig).
    Exec {
        #[command(flatten)]
        rig: RigId,
        /// The node.
        node: usize,
        /// The command.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<OsString>,
    },
    /// Print node NODE's address.
    Addr {
        #[command(flatten)]
        rig: RigId,
        /// The node.
        node: usize,
    },
    /// Start or stop a node's omd.
    Omd {
        #[command(flatten)]
        rig: RigId,
        /// start or stop.
        #[arg(value_parser = ["start", "stop"])]
        action: String,
        /// The node.
        node: usize,
    },
    /// Tear down rigs whose owner died.
    Sweep,
    /// (tests) Bring a rig up with `sleep` running in every node, print `id`, `reaper` and `pid` lines
    /// and `ready`, then wait until killed.
    Hold {
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
    },
    /// (tests) Answer each line received on ADDR with `TAG: line`.
    EchoServer {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Prefix of every answer.
        #[arg(long)]
        tag: String,
    },
    /// (tests) Send MESSAGE to an echo server (retrying the connection for 5 s) and print the answer.
    EchoClient {
        /// The server.
        #[arg(long)]
        connect: SocketAddr,
        /// One line to send.
        #[arg(long)]
        message: String,
    },
}

#[derive(Debug, clap::Args)]
struct RigId {
    /// The rig (default: $OMRIG_ID, set by `omrig run`).
    #[arg(long = "rig", env = "OMRIG_ID")]
    id: String,
}

fn main() -> ExitCode {
    match run(Args::parse().cmd) {
        Ok(code) => code,
        Err(e) => {
            let mut msg = format!("omrig: error: {e}");
            let mut src = std::error::Error::source(&*e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

type Res = Result<ExitCode, Box<dyn std::error::Error>>;

fn omd_binary() -> std::io::Result<PathBuf> {
    Ok(std::env::current_exe()?.with_file_name("omd"))
}

fn run(cmd: Cmd) -> Res {
    match cmd {
        Cmd::Run { nodes, omd, cmd } => {
            let rig = Rig::new(nodes)?;
            if omd {
                let bin = omd_binary()?;
                for i in 0..nodes {
                    rig.start_omd(i, &bin, &[])?;
                }
            }
            let status = Command::new(&cmd[0])
                .args(&cmd[1..])
                .env("OMRIG_ID", rig.id())
                .status()?;
            rig.teardown()?;
            Ok(ExitCode::from(
                u8::try_from(status.code().unwrap_or(1) & 0xff).unwrap_or(1),
            ))
        }
        Cmd::Exec { rig, node, cmd } => {
            let rig = Rig::attach(&rig.id)?;
            let err = rig.node(node)?.command(&cmd[0]).args(&cmd[1..]).exec();
            Err(Box::new(RigError::Spawn {
                cmd: format!("{cmd:?}"),
                source: err,
            }))
        }
        Cmd::Addr { rig, node } => {
            println!("{}", Rig::attach(&rig.id)?.node(node)?.addr());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Omd { rig, action, node } => {
            let rig = Rig::attach(&rig.id)?;
            if action == "start" {
                let h = rig.start_omd(node, &omd_binary()?, &[])?;
                println!(
                    "omd pid {} listen {} control {}",
                    h.pid,
                    h.listen,
                    h.control.display()
                );
            } else {
                rig.stop_omd(node)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Sweep => {
            om_rig::sweep_stale();
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Hold { nodes } => hold(nodes),
        Cmd::EchoServer { listen, tag } => echo_server(listen, &tag),
        Cmd::EchoClient { connect, message } => echo_client(connect, &message),
    }
}

fn hold(nodes: usize) -> Res {
    let rig = Rig::new(nodes)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "id {}", rig.id())?;
    for n in rig.nodes() {
        let pid = rig.spawn(n.command("sleep").arg("1000").stdin(Stdio::null()))?;
        writeln!(out, "pid {pid}")?;
    }
    writeln!(out, "ready")?;
    out.flush()?;
    drop(out);
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

fn echo_server(listen: SocketAddr, tag: &str) -> Res {
    let listener = TcpListener::bind(listen)?;
    for conn in listener.incoming() {
        let conn = conn?;
        let tag = tag.to_owned();
        thread::spawn(move || {
            let mut w = conn.try_clone()?;
            for line in BufReader::new(conn).lines() {
                writeln!(w, "{tag}: {}", line?)?;
            }
            std::io::Result::Ok(())
        });
    }
    Ok(ExitCode::SUCCESS)
}

fn echo_client(connect: SocketAddr, message: &str) -> Res {
    let deadline = Instant::now() + Duration::from_secs(5);
    let stream = loop {
        match TcpStream::connect_timeout(&connect, Duration::from_secs(1)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    };
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut w = stream.try_clone()?;
    writeln!(w, "{message}")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    print!("{line}");
    Ok(ExitCode::SUCCESS)
}
