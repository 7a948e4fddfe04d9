//! `wsticket store inspect` and `wsticket store compact`, for a stopped
//! server's data directory.
//!
//! Both take the directory's lock, so they refuse to run while a server uses
//! it. Neither prints ticket values; the store only holds their SHA-256.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::sled_store::{open_db, OpenError};
use super::{TicketRecord, TicketState};
use crate::clock::{Clock, SystemClock};
use crate::config::{StoreArgs, StoreCommand};

#[derive(Debug, thiserror::Error)]
pub enum StoreCliError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("data directory {path} does not exist")]
    Missing { path: PathBuf },
    #[error("reading the store in {path} failed: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error(
        "compacting the store in {path} failed: {reason}; the original directory is unchanged"
    )]
    Compact { path: PathBuf, reason: String },
}

/// Record counts and size of a data directory.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Inventory {
    /// Issued, not used, not expired.
    pub live: u64,
    pub consumed: u64,
    /// Expired and still inside the grace window.
    pub expired: u64,
    /// Past the grace window: the next start or compaction deletes them.
    pub purgeable: u64,
    pub undecodable: u64,
    pub disk_bytes: u64,
}

impl fmt::Display for Inventory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "live        {}", self.live)?;
        writeln!(f, "consumed    {}", self.consumed)?;
        writeln!(f, "expired     {} (inside the grace window)", self.expired)?;
        writeln!(f, "purgeable   {} (past the grace window)", self.purgeable)?;
        if self.undecodable > 0 {
            writeln!(f, "undecodable {}", self.undecodable)?;
        }
        write!(f, "disk bytes  {}", self.disk_bytes)
    }
}

pub fn run(command: StoreCommand) -> Result<String, StoreCliError> {
    match command {
        StoreCommand::Inspect(args) => inspect(&args).map(|inventory| inventory.to_string()),
        StoreCommand::Compact(args) => {
            let (before, after) = compact(&args)?;
            Ok(format!(
                "before compaction:\n{before}\n\nafter compaction:\n{after}"
            ))
        }
    }
}

fn require_dir(path: &Path) -> Result<(), StoreCliError> {
    if path.is_dir() {
        Ok(())
    } else {
        Err(StoreCliError::Missing {
            path: path.to_owned(),
        })
    }
}

/// Counts the records of a data directory by state.
pub fn inspect(args: &StoreArgs) -> Result<Inventory, StoreCliError> {
    require_dir(&args.data_dir)?;
    let db = open_db(&args.data_dir)?;
    let mut inventory = count(&db, args.expired_grace).map_err(|reason| StoreCliError::Read {
        path: args.data_dir.clone(),
        reason,
    })?;
    drop(db);
    inventory.disk_bytes = directory_size(&args.data_dir);
    Ok(inventory)
}

fn count(db: &sled::Db, grace: Duration) -> Result<Inventory, String> {
    let now = SystemClock.now_ms();
    let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
    let mut inventory = Inventory::default();
    for value in db.iter().values() {
        let bytes = value.map_err(|err| err.to_string())?;
        let Ok(record) = TicketRecord::decode(&bytes) else {
            inventory.undecodable += 1;
            continue;
        };
        if now >= record.expires_at_ms.saturating_add(grace_ms) {
            inventory.purgeable += 1;
            continue;
        }
        match record.state {
            TicketState::Consumed => inventory.consumed += 1,
            TicketState::Issued if !record.is_expired_at(now) => inventory.live += 1,
            TicketState::Issued | TicketState::Expired => inventory.expired += 1,
        }
    }
    Ok(inventory)
}

/// Rewrites the store without its purgeable records into a new directory,
/// then swaps the directories. Until the swap the original is untouched.
pub fn compact(args: &StoreArgs) -> Result<(Inventory, Inventory), StoreCliError> {
    let before = inspect(args)?;
    let path = &args.data_dir;
    let failed = |reason: String| StoreCliError::Compact {
        path: path.clone(),
        reason,
    };
    let pid = std::process::id();
    let fresh_path = sibling(path, &format!("compact-{pid}"));
    let old_path = sibling(path, &format!("old-{pid}"));

    let now = SystemClock.now_ms();
    let grace_ms = u64::try_from(args.expired_grace.as_millis()).unwrap_or(u64::MAX);
    {
        let old = open_db(path)?;
        let fresh = open_db(&fresh_path)?;
        for entry in old.iter() {
            let (key, bytes) = entry.map_err(|err| failed(err.to_string()))?;
            let keep = TicketRecord::decode(&bytes)
                .map(|record| now < record.expires_at_ms.saturating_add(grace_ms))
                .unwrap_or(true);
            if keep {
                fresh
                    .insert(key, bytes)
                    .map_err(|err| failed(err.to_string()))?;
            }
        }
        fresh.flush().map_err(|err| failed(err.to_string()))?;
    }
    std::fs::rename(path, &old_path)
        .map_err(|err| failed(format!("moving the old store aside: {err}")))?;
    if let Err(err) = std::fs::rename(&fresh_path, path) {
        // Put the original back so the server finds it where it was.
        let _ = std::fs::rename(&old_path, path);
        return Err(failed(format!(
            "moving the compacted store in place: {err}"
        )));
    }
    std::fs::remove_dir_all(&old_path).map_err(|err| {
        failed(format!(
            "removing the old store {}: {err}",
            old_path.display()
        ))
    })?;
    let after = inspect(args)?;
    Ok((before, after))
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{suffix}"));
    path.with_file_name(name)
}

fn directory_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => directory_size(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}
