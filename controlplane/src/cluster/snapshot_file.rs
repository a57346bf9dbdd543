//! A member's snapshots live in files beside its store, never in memory:
//! a build writes the store into a file row by row, the leader sends it
//! in chunks read from that file (each stream on its own file handle, so
//! streams to several followers never share an offset), and a follower
//! writes the chunks it receives into a file of its own and installs the
//! store from it row by row. A snapshot's size is therefore the member's
//! disk, not its memory, however many storage assets the store holds.
//!
//! The files, for a store at `authority.redb`: `authority.snapshot` (the
//! snapshot the member hands out), `authority.snapshot-building` and
//! `authority.snapshot-receiving`. A build or a received snapshot is
//! renamed over the first once it is the newest; a handle already open on
//! the old one reads it to its end. None is needed across a restart (the
//! store is what is durable), so a start removes them.
//!
//! The file is read and written on the control-plane thread as openraft
//! asks, in chunks of `snapshot_max_chunk_size`: each is a read or write
//! of the page cache, like the store's own work on that thread, so
//! [`SnapshotFile`] completes every operation at once rather than handing
//! it to another thread and waking on its answer.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

/// Where a member's snapshot files are, beside its store.
#[derive(Clone, Debug)]
pub struct SnapshotPaths {
    /// The snapshot the member hands out.
    pub current: PathBuf,
    /// A build in progress.
    pub building: PathBuf,
    /// A snapshot being received.
    pub receiving: PathBuf,
}

impl SnapshotPaths {
    /// The snapshot files of the store at `store`.
    pub fn beside(store: &Path) -> Self {
        Self {
            current: store.with_extension("snapshot"),
            building: store.with_extension("snapshot-building"),
            receiving: store.with_extension("snapshot-receiving"),
        }
    }

    /// Remove every snapshot file (what a start does: none is needed
    /// once the store is open).
    pub fn remove_all(&self) {
        for path in [&self.current, &self.building, &self.receiving] {
            if let Err(e) = std::fs::remove_file(path)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "could not remove an old snapshot file");
            }
        }
    }
}

/// One open snapshot file: openraft's `SnapshotData`.
#[derive(Debug)]
pub struct SnapshotFile {
    file: File,
    path: PathBuf,
    /// The result of the last `start_seek`, for `poll_complete`.
    seeked: Option<io::Result<u64>>,
}

impl SnapshotFile {
    /// A new, empty file at `path`, replacing whatever was there (a handle
    /// still open on that keeps it whole).
    pub fn create(path: &Path) -> io::Result<Self> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Self::from(file, path))
    }

    /// The file at `path`, for reading from its start.
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self::from(File::open(path)?, path))
    }

    fn from(file: File, path: &Path) -> Self {
        Self {
            file,
            path: path.to_owned(),
            seeked: None,
        }
    }

    /// Where this file was opened (it may have been renamed or removed
    /// since).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// The whole file, from its start (tests).
    #[cfg(test)]
    pub fn bytes(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.file.seek(SeekFrom::Start(0))?;
        self.file.read_to_end(&mut out)?;
        Ok(out)
    }
}

impl AsyncRead for SnapshotFile {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let read = this.file.read(buf.initialize_unfilled())?;
        buf.advance(read);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(self.get_mut().file.write(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.get_mut().file.flush())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

impl AsyncSeek for SnapshotFile {
    /// Never past the file's end: a snapshot is written chunk after chunk
    /// (a chunk sent again goes back), so a chunk further on is refused
    /// rather than leaving a hole that would make the file claim bytes no
    /// member sent.
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        let len = this.file.metadata()?.len();
        let target = match position {
            SeekFrom::Start(at) => Some(at),
            SeekFrom::End(by) => len.checked_add_signed(by),
            SeekFrom::Current(by) => this.file.stream_position()?.checked_add_signed(by),
        };
        this.seeked = Some(match target {
            Some(at) if at <= len => this.file.seek(SeekFrom::Start(at)),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a snapshot chunk past the {len} bytes received so far"),
            )),
        });
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let this = self.get_mut();
        Poll::Ready(match this.seeked.take() {
            Some(done) => done,
            None => this.file.stream_position(),
        })
    }
}
