//! The daemon's sockets and its serving loop.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use std::sync::Arc;

use om_transport::{ClusterKey, KeyError, Receiver, ReceiverConfig};

use crate::control;
use crate::image::{Limits, Store};
use crate::restorer::Restorer;
use crate::runtimes::Runtimes;

/// The SCI transport's exporter, when this node has a SISCI library (Dolphin's, or the emulation named
/// by `OM_SISCI_LIB`); without one omd offers TCP only.
fn sci_exporter() -> Option<Arc<dyn om_transport::api::Exporter>> {
    match om_sci::SciExporter::open() {
        Ok(e) => {
            tracing::info!(node = e.node(), library = e.library(), "SCI transport offered");
            Some(Arc::new(e))
        }
        Err(e) => {
            tracing::debug!(reason = %e, "no SCI transport");
            None
        }
    }
}

/// The verbs transport's exporter, when this node has libibverbs and an active RDMA port; an image
/// may pin at most `per_image` bytes of registered memory.
fn verbs_exporter(per_image: u64) -> Option<Arc<dyn om_transport::api::Exporter>> {
    match om_verbs::VerbsExporter::open(per_image) {
        Ok(e) => Some(Arc::new(e)),
        Err(e) => {
            tracing::debug!(reason = %e, "no verbs transport");
            None
        }
    }
}

/// omd's configuration, as `omd --help` describes it.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where other nodes connect.
    pub listen: SocketAddr,
    /// The cluster key file.
    pub key: PathBuf,
    /// The local control socket.
    pub control: PathBuf,
    /// Where images and state are kept.
    pub state_dir: Option<PathBuf>,
    /// Memory limits for incoming images.
    pub limits: Limits,
    /// Image memory kept allocated ahead of the next incoming image ([`Store::set_reserve`]).
    pub reserve: u64,
    /// How long a silent peer keeps its image.
    pub idle_timeout: Duration,
}

/// Why omd could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The key file was refused.
    #[error("cluster key refused")]
    Key(#[source] KeyError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The control socket's directory could not be created.
    #[error("cannot create directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The reserve does not fit the memory limits.
    #[error("--reserve refused: {0}")]
    Reserve(String),
    /// Another omd answers on the control socket.
    #[error("another omd is already serving control socket {path}")]
    ControlInUse {
        /// The socket.
        path: PathBuf,
    },
    /// The control socket could not be bound.
    #[error("cannot bind control socket {path}")]
    BindControl {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A started daemon: sockets bound, key loaded.
#[derive(Debug)]
pub struct Daemon {
    config: Config,
    key: ClusterKey,
    listener: TcpListener,
    control: UnixListener,
}

impl Daemon {
    /// Loads the key and binds both sockets. Nothing is served until [`Daemon::serve`].
    ///
    /// # Errors
    /// A [`DaemonError`] naming what could not be set up.
    pub fn bind(config: Config) -> Result<Self, DaemonError> {
        let key = ClusterKey::load(&config.key).map_err(DaemonError::Key)?;
        config
            .limits
            .check_reserve(config.reserve)
            .map_err(DaemonError::Reserve)?;
        if let Some(dir) = &config.state_dir {
            create_private_dir(dir)?;
        }
        let listener = TcpListener::bind(config.listen).map_err(|source| DaemonError::Listen {
            addr: config.listen,
            source,
        })?;
        let control = bind_control(&config.control)?;
        Ok(Self {
            config,
            key,
            listener,
            control,
        })
    }

    /// The address other nodes connect to (with the real port if 0 was asked for).
    ///
    /// # Errors
    /// When the socket cannot report its address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves both sockets on background threads and returns; the daemon lives until the process ends.
    ///
    /// # Errors
    /// When a serving thread cannot be started.
    pub fn serve(self) -> io::Result<ServeHandle> {
        tracing::info!(listen = %self.config.listen, control = %self.config.control.display(), key = ?self.key,
            image_limit = self.config.limits.per_image, total_limit = self.config.limits.total, "omd serving");
        let Self {
            config,
            key,
            listener,
            control,
        } = self;
        let runtimes = Runtimes::default();
        let incoming = config
            .state_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("omd-{}", std::process::id())))
            .join("incoming");
        create_private_dir(&incoming).map_err(io::Error::other)?;
        let fault = std::env::var("OM_FAULT")
            .ok()
            .and_then(|v| om_transport::tcp::receiver::CrashPoint::parse(&v));
        let restorer = Restorer {
            program: std::env::var_os("OM_RESTORE")
                .map_or_else(|| om_cli::sibling("om-restore"), PathBuf::from),
            dir: incoming,
            runtimes: runtimes.clone(),
            control: fs::canonicalize(&config.control).unwrap_or_else(|_| config.control.clone()),
            listen: listener.local_addr().unwrap_or(config.listen),
            fault,
        };
        let store = Store::with_restorer(config.limits, Some(Arc::new(restorer)));
        store.set_reserve(config.reserve).map_err(io::Error::other)?;
        let key_path = fs::canonicalize(&config.key).unwrap_or_else(|_| config.key.clone());
        let receiver = Receiver::new(
            key,
            Arc::new(store.clone()),
            ReceiverConfig {
                idle_timeout: config.idle_timeout,
                crash_at: fault,
                exporters: sci_exporter()
                    .into_iter()
                    .chain(verbs_exporter(config.limits.per_image))
                    .collect(),
                ..ReceiverConfig::default()
            },
        );
        let peers = Arc::clone(&receiver);
        thread::Builder::new()
            .name("omd-peers".into())
            .spawn(move || serve_peers(&listener, &peers))?;
        thread::Builder::new()
            .name("omd-control".into())
            .spawn(move || serve_control(&control, &store, &runtimes, &key_path, &receiver))?;
        Ok(ServeHandle {
            control_path: config.control,
        })
    }
}

/// What is left to clean up when the daemon stops.
#[derive(Debug)]
pub struct ServeHandle {
    control_path: PathBuf,
}

impl ServeHandle {
    /// Removes the control socket so that no client connects to a dead daemon.
    pub fn shutdown(self) {
        if let Err(e) = fs::remove_file(&self.control_path) {
            tracing::warn!(path = %self.control_path.display(), error = %e, "cannot remove control socket");
        }
    }
}

fn create_private_dir(path: &Path) -> Result<(), DaemonError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| DaemonError::CreateDir {
            path: path.to_path_buf(),
            source,
        })
}

fn bind_control(path: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_dir(parent)?;
    }
    if path.exists() {
        // A socket file that nobody answers on is left over from a daemon that died; one that answers
        // belongs to a live daemon and must not be stolen.
        if UnixStream::connect(path).is_ok() {
            return Err(DaemonError::ControlInUse {
                path: path.to_path_buf(),
            });
        }
        let _ = fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| DaemonError::BindControl {
        path: path.to_path_buf(),
        source,
    })?;
    // Only the owner may drive this daemon.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
        DaemonError::BindControl {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(listener)
}

fn serve_peers(listener: &TcpListener, receiver: &Arc<Receiver<Store>>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let r = Arc::clone(receiver);
                let spawned = thread::Builder::new()
                    .name("omd-peer".into())
                    .spawn(move || serve_peer(&r, stream));
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a peer thread; connection dropped");
                }
            }
            Err(e) => tracing::warn!(error = %e, "accept failed"),
        }
    }
}

fn serve_peer(receiver: &Arc<Receiver<Store>>, stream: TcpStream) {
    let peer = stream.peer_addr().ok();
    match receiver.serve(stream) {
        Ok(outcome) => tracing::debug!(?peer, ?outcome, "peer done"),
        Err(e) => tracing::warn!(?peer, error = %om_transport::error::chain(&e), "peer failed"),
    }
}

fn serve_control(
    listener: &UnixListener,
    store: &Store,
    runtimes: &Runtimes,
    key: &Path,
    receiver: &Arc<Receiver<Store>>,
) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let (store, runtimes, key) = (store.clone(), runtimes.clone(), key.to_path_buf());
                let receiver = Arc::clone(receiver);
                let spawned = thread::Builder::new().name("omd-ctl".into()).spawn(move || {
                    let incoming = || receiver.incoming();
                    let node = control::Node {
                        store: &store,
                        runtimes: &runtimes,
                        key: &key,
                        incoming: &incoming,
                    };
                    if let Err(e) = handle_control(stream, &node) {
                        tracing::debug!(error = %e, "control connection failed");
                    }
                });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a control thread");
                }
            }
            Err(e) => tracing::warn!(error = %e, "control accept failed"),
        }
    }
}

fn handle_control(stream: UnixStream, node: &control::Node<'_>) -> io::Result<()> {
    let runtimes = node.runtimes;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(
        stream
            .try_clone()?
            .take(u64::try_from(control::MAX_REQUEST).unwrap_or(4096)),
    );
    let mut writer = stream;
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(()),
            Ok(_) if !line.ends_with('\n') => {
                writeln!(writer, "ERR request longer than {} bytes", control::MAX_REQUEST)?;
                return Ok(());
            }
            Ok(_) => {
                let request = line.trim_end();
                if let Some(pid) = request.strip_prefix("register ") {
                    // The connection now belongs to the runtime: omd writes requests, it answers.
                    match pid
                        .trim()
                        .parse::<u32>()
                        .map_err(|e| e.to_string())
                        .and_then(|p| runtimes.register(p, &writer))
                    {
                        // Answered by `register`, before any request can follow.
                        Ok(()) => {}
                        Err(e) => writeln!(writer, "ERR {e}")?,
                    }
                    return Ok(());
                }
                if let Some(args) = request.strip_prefix("at ") {
                    // omrun: where its process runs now.
                    let reply = match args.split_ascii_whitespace().collect::<Vec<_>>().as_slice() {
                        [pid, at] if at.parse::<std::net::SocketAddr>().is_ok() => pid
                            .parse::<u32>()
                            .map_err(|e| e.to_string())
                            .and_then(|p| runtimes.relocate(p, at, &writer)),
                        _ => Err("usage: at PID IP:PORT".to_owned()),
                    };
                    match reply {
                        Ok(()) => writeln!(writer, "OK")?,
                        Err(e) => writeln!(writer, "ERR {e}")?,
                    }
                    continue;
                }
                writeln!(writer, "{}", control::answer(request, node))?;
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                writeln!(writer, "ERR request is not UTF-8")?;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
}
