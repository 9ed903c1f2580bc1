//! The receiving side: omd exports each incoming image's memory as window segments, and a mailbox
//! segment and a doorbell interrupt per session.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use om_transport::api::{Export, Exportable, Exporter, Refusal};
use om_transport::wire::{ErrorCode, Extent, Placement, caps};

use crate::error::SciError;
use crate::mailbox;
use crate::sys::{LocalInterrupt, LocalSegment, Sisci, Windows};

/// Bytes of one window: 1 GiB.
pub const WINDOW_SHIFT: u32 = 30;

/// Exports image memory over SISCI (omd's side of the SCI transport).
#[derive(Debug)]
pub struct SciExporter {
    sci: Arc<Sisci>,
    node: u32,
}

impl SciExporter {
    /// Loads the SISCI library and learns this node's id.
    ///
    /// # Errors
    /// No SISCI library, or the fabric failing.
    pub fn open() -> Result<Self, SciError> {
        Self::open_with(None)
    }

    /// Like `open`, with the SISCI library at `library`.
    ///
    /// # Errors
    /// As `open`.
    pub fn open_with(library: Option<&str>) -> Result<Self, SciError> {
        let sci = Sisci::open(library)?;
        let node = sci.node()?;
        Ok(Self {
            sci: Arc::new(sci),
            node,
        })
    }

    /// This node's id on the fabric.
    #[must_use]
    pub fn node(&self) -> u32 {
        self.node
    }

    /// The SISCI library in use.
    #[must_use]
    pub fn library(&self) -> &str {
        self.sci.library()
    }

    fn export_sci(&self, image: Arc<dyn Exportable>) -> Result<SciExport, SciError> {
        let mut ids =
            std::iter::repeat_with(|| u32::from_le_bytes(om_transport::auth::random_bytes()) | 1).take(256);
        let windows =
            self.sci
                .export_windows(image, WINDOW_SHIFT, om_transport::wire::MAX_WINDOWS, &mut ids)?;
        let mailbox = self.sci.segment(&mut ids, mailbox::BYTES)?;
        let view = mailbox
            .view()
            .ok_or_else(|| SciError::Mailbox("mailbox not mapped".into()))?;
        mailbox::init(&view);
        let doorbell = self.sci.interrupt()?;
        Ok(SciExport {
            doorbell,
            mailbox,
            windows,
            node: self.node,
            tail: Mutex::new(0),
            _sci: Arc::clone(&self.sci),
        })
    }
}

fn refusal(e: &SciError) -> Refusal {
    let code = match e {
        SciError::Mailbox(_) => ErrorCode::Protocol,
        SciError::TooLarge { .. } => ErrorCode::Limit,
        _ => ErrorCode::Internal,
    };
    (code, format!("SCI: {e}"))
}

impl Exporter for SciExporter {
    fn cap(&self) -> u32 {
        caps::SCI
    }

    fn export(
        &self,
        image: Arc<dyn Exportable>,
        _local: std::net::IpAddr,
    ) -> Result<Box<dyn Export>, Refusal> {
        match self.export_sci(image) {
            Ok(e) => Ok(Box::new(e)),
            Err(e) => Err(refusal(&e)),
        }
    }
}

impl Drop for SciExport {
    fn drop(&mut self) {
        self.abandon();
    }
}

/// One session's export: withdrawn (doorbell, mailbox, then windows) when dropped.
#[derive(Debug)]
pub struct SciExport {
    doorbell: LocalInterrupt,
    mailbox: LocalSegment,
    windows: Windows,
    node: u32,
    tail: Mutex<u64>,
    _sci: Arc<Sisci>,
}

impl Export for SciExport {
    fn placement(&self, extents: Vec<Extent>) -> Result<Placement, Refusal> {
        Ok(Placement {
            node: self.node,
            mailbox: self.mailbox.id(),
            doorbell: self.doorbell.number(),
            window_shift: WINDOW_SHIFT,
            windows: self.windows.ids(),
            extents,
            endpoint: Vec::new(),
        })
    }

    fn abandon(&self) {
        if let Some(v) = self.mailbox.view() {
            mailbox::abandon(&v);
        }
    }

    fn next(&self, timeout: Duration) -> Result<Option<Vec<u8>>, Refusal> {
        let mut tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        let view = self
            .mailbox
            .view()
            .ok_or_else(|| refusal(&SciError::Mailbox("mailbox not mapped".into())))?;
        for attempt in 0..2 {
            if let Some(body) = mailbox::take(&view, *tail).map_err(|e| refusal(&e))? {
                *tail += 1;
                return Ok(Some(body));
            }
            if attempt == 0 && !self.doorbell.wait(timeout).map_err(|e| refusal(&e))? {
                return Ok(None);
            }
        }
        Ok(None)
    }
}
