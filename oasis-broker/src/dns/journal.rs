//! The fake-address journal: every answer that changed the table is
//! appended here before it leaves, so a daemon killed between two saves of
//! the table (`kill -9`, a crash) never forgets an address a client may
//! still hold, and never gives it to a second name. Written, not synced: it
//! must outlive the process, not the machine (after a reboot no
//! application holds an old answer either).
//!
//! Saving the table rotates the journal: the current file becomes
//! `.old`, the table is written, and `.old` is removed. A daemon that dies
//! in between finds both files and replays what the table lacks.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::fake::Assigned;

#[derive(Debug, thiserror::Error)]
#[error("fake-address journal {path}: {source}")]
pub struct JournalError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

pub struct Journal {
    path: PathBuf,
    old: PathBuf,
    file: Mutex<File>,
}

/// Where the journal of the table saved at `state_file` lives.
pub fn journal_path(state_file: &Path) -> PathBuf {
    state_file.with_extension("journal")
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl Journal {
    /// Opens (or creates) the journal next to `state_file`.
    pub fn open(state_file: &Path) -> Result<Journal, JournalError> {
        let path = journal_path(state_file);
        let error = |source| JournalError {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(error)?;
        }
        let mut file = open_append(&path).map_err(error)?;
        // A line torn by a crash must not swallow the next one.
        let len = file.metadata().map_err(error)?.len();
        if len > 0 {
            use std::io::{Read, Seek, SeekFrom};
            let mut last = [0u8];
            let mut reader = File::open(&path).map_err(error)?;
            reader.seek(SeekFrom::Start(len - 1)).map_err(error)?;
            reader.read_exact(&mut last).map_err(error)?;
            if last[0] != b'\n' {
                file.write_all(b"\n").map_err(error)?;
            }
        }
        Ok(Journal {
            old: path.with_extension("journal.old"),
            path,
            file: Mutex::new(file),
        })
    }

    /// Everything both files hold; a torn last line (the process died in
    /// the middle of a write) is skipped.
    pub fn read(state_file: &Path) -> Vec<Assigned> {
        let path = journal_path(state_file);
        let mut out = Vec::new();
        for file in [path.with_extension("journal.old"), path] {
            let Ok(file) = File::open(&file) else { continue };
            for line in BufReader::new(file).lines() {
                let Ok(line) = line else { break };
                if let Ok(assigned) = serde_json::from_str::<Assigned>(&line) {
                    out.push(assigned);
                }
            }
        }
        out
    }

    /// Appends one answer, in one write.
    pub fn append(&self, assigned: &Assigned) -> Result<(), JournalError> {
        let mut line = serde_json::to_vec(assigned).map_err(|e| self.error(std::io::Error::other(e)))?;
        line.push(b'\n');
        self.lock().write_all(&line).map_err(|e| self.error(e))
    }

    /// Holds the journal while `snapshot` copies the table (None: nothing
    /// to save) and starts a new file: answers journaled later are newer
    /// than the copy. Returns the copy; call [`saved`](Self::saved) once it
    /// is on disk.
    pub fn rotate<T>(&self, snapshot: impl FnOnce() -> Option<T>) -> Result<Option<T>, JournalError> {
        let mut file = self.lock();
        let Some(copy) = snapshot() else {
            return Ok(None);
        };
        if self.old.exists() {
            // The last save never finished: keep its entries, add these.
            let current = std::fs::read(&self.path).map_err(|e| self.error(e))?;
            open_append(&self.old)
                .and_then(|mut old| old.write_all(&current))
                .map_err(|e| self.error(e))?;
        } else {
            std::fs::rename(&self.path, &self.old).map_err(|e| self.error(e))?;
        }
        let fresh = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.path)
            .map_err(|e| self.error(e))?;
        *file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| self.error(e))?;
        drop(fresh);
        Ok(Some(copy))
    }

    /// The table copied by `rotate` is saved: the old entries can go.
    pub fn saved(&self) {
        let _ = std::fs::remove_file(&self.old);
    }

    fn lock(&self) -> MutexGuard<'_, File> {
        self.file.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn error(&self, source: std::io::Error) -> JournalError {
        JournalError {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeEntry;

    fn assigned(seq: u64, name: &str) -> Assigned {
        Assigned {
            seq,
            entry: FakeEntry {
                fake: format!("198.18.0.{seq}").parse().unwrap(),
                name: name.into(),
                real: vec!["192.0.2.1".parse().unwrap()],
                carrier: "exit".into(),
                claimed: None,
                last_used: 1,
                live_flows: 0,
            },
        }
    }

    #[test]
    fn entries_survive_rotation_until_the_save_and_torn_lines_are_skipped() {
        let dir = std::env::temp_dir().join(format!("oasis-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = dir.join("fake-addresses.json");
        let journal = Journal::open(&state).unwrap();
        journal.append(&assigned(1, "a.test")).unwrap();
        journal.append(&assigned(2, "b.test")).unwrap();
        // A save starts: the copy covers 1 and 2, then 3 is answered ...
        assert_eq!(
            journal.rotate(|| None::<u64>).unwrap(),
            None,
            "nothing to save: no rotation"
        );
        assert_eq!(Journal::read(&state).len(), 2);
        let copy = journal.rotate(|| Some(2)).unwrap();
        assert_eq!(copy, Some(2));
        journal.append(&assigned(3, "c.test")).unwrap();
        // ... and the daemon dies before the table is on disk: all three.
        let seqs: Vec<u64> = Journal::read(&state).iter().map(|a| a.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        // The next save finds the unfinished one and keeps its entries.
        journal.rotate(|| Some(())).unwrap();
        journal.append(&assigned(4, "d.test")).unwrap();
        assert_eq!(Journal::read(&state).len(), 4);
        journal.saved();
        let seqs: Vec<u64> = Journal::read(&state).iter().map(|a| a.seq).collect();
        assert_eq!(seqs, vec![4]);
        // A write cut short by a crash.
        std::fs::OpenOptions::new()
            .append(true)
            .open(journal_path(&state))
            .unwrap()
            .write_all(b"{\"seq\":5,\"entry\":{\"fa")
            .unwrap();
        assert_eq!(Journal::read(&state).len(), 1);
        // Reopened after that crash, the next entry is not lost with it.
        let journal = Journal::open(&state).unwrap();
        journal.append(&assigned(6, "f.test")).unwrap();
        let seqs: Vec<u64> = Journal::read(&state).iter().map(|a| a.seq).collect();
        assert_eq!(seqs, vec![4, 6]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
