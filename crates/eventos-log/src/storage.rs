//! File I/O behind a small trait, so tests can fail or "crash" the log at
//! any chosen write or sync and check what survives.
//!
//! [`FsStorage`] is the real thing. [`SimStorage`] is an in-memory file
//! system that tracks, for every file and directory entry, what has been
//! made durable (`sync_data`, `sync_dir`) and what has not; after a
//! simulated crash, [`SimStorage::after_crash`] returns the disk as a power
//! loss would leave it — synced bytes, plus possibly a torn prefix of the
//! unsynced ones. The model follows redb's crash-consistency tests.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// A directory tree of files the log can live in.
pub trait Storage: Send + Sync + fmt::Debug + 'static {
    /// Creates `dir` and its parents.
    ///
    /// # Errors
    ///
    /// The underlying I/O error.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the entries of `dir` (files and directories), sorted.
    ///
    /// # Errors
    ///
    /// The underlying I/O error; `NotFound` if `dir` does not exist.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens a file for reading and appending, creating it if asked.
    ///
    /// # Errors
    ///
    /// The underlying I/O error; `NotFound` if absent and not `create`.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>>;
    /// Removes a file.
    ///
    /// # Errors
    ///
    /// The underlying I/O error.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Renames a file, replacing `to`.
    ///
    /// # Errors
    ///
    /// The underlying I/O error.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes `dir`'s entries (creations, removals, renames) durable.
    ///
    /// # Errors
    ///
    /// The underlying I/O error.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// An open file: positional reads, appends, data sync.
pub trait StorageFile: Send + Sync + fmt::Debug {
    /// Current length in bytes.
    ///
    /// # Errors
    ///
    /// The underlying I/O error.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    ///
    /// # Errors
    ///
    /// The underlying I/O error.
    fn is_empty(&self) -> io::Result<bool> {
        self.len().map(|n| n == 0)
    }
    /// Reads into `buf` from `pos`; returns how many bytes were read (0 at
    /// the end).
    ///
    /// # Errors
    ///
    /// The underlying I/O error.
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// Appends `data` at the end of the file.
    ///
    /// # Errors
    ///
    /// The underlying I/O error; some prefix of `data` may have been written.
    fn append(&self, data: &[u8]) -> io::Result<()>;
    /// Makes the file's content durable (`fdatasync`).
    ///
    /// # Errors
    ///
    /// The underlying I/O error; durability is then unknown.
    fn sync_data(&self) -> io::Result<()>;
    /// Truncates (or extends with zeros) to `len`.
    ///
    /// # Errors
    ///
    /// The underlying I/O error.
    fn set_len(&self, len: u64) -> io::Result<()>;
}

/// Reads a whole file.
pub(crate) fn read_all(file: &dyn StorageFile) -> io::Result<Vec<u8>> {
    let len = usize::try_from(file.len()?).map_err(|_| io::Error::other("file too large"))?;
    let mut buf = vec![0; len];
    let mut done = 0;
    while done < len {
        let n = file.read_at(done as u64, &mut buf[done..])?;
        if n == 0 {
            buf.truncate(done);
            break;
        }
        done += n;
    }
    Ok(buf)
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct FsStorage;

#[derive(Debug)]
struct FsFile {
    file: File,
}

/// `std::fs::create_dir_all`, with the directories it creates owner-only
/// (0700).
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

impl Storage for FsStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        create_private_dir(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let mut options = OpenOptions::new();
        options.read(true).append(true).create(create);
        // Segments hold every event: the owner's only.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(path)?;
        Ok(Arc::new(FsFile { file }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

impl StorageFile for FsFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read_at(buf, pos)
    }

    fn append(&self, data: &[u8]) -> io::Result<()> {
        // Opened with O_APPEND: every write lands at the end.
        (&self.file).write_all(data)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}

/// Which operation a [`SimStorage`] fails at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Never fail.
    None,
    /// Crash during the k-th sync (1-based, file or directory): it does not
    /// complete, and every later operation fails as on a dead machine.
    CrashAtSync(u64),
    /// The k-th append fails with an I/O error (after writing half of its
    /// bytes); the storage keeps working.
    FailAppend(u64),
    /// Every append from the k-th on fails without writing anything, as on
    /// a full disk, until [`SimStorage::free_space`].
    FullFrom(u64),
}

#[derive(Debug, Default)]
struct SimFileData {
    data: Vec<u8>,
    durable_len: usize,
}

#[derive(Debug)]
struct SimState {
    next_inode: u64,
    files: HashMap<u64, SimFileData>,
    /// Directory entries as the running system sees them.
    names: BTreeMap<PathBuf, u64>,
    /// Directory entries as they would survive a crash.
    durable_names: BTreeMap<PathBuf, u64>,
    dirs: Vec<PathBuf>,
    fault: Fault,
    syncs: u64,
    appends: u64,
    crashed: bool,
}

/// An in-memory file system that can crash; see the module docs.
#[derive(Clone)]
pub struct SimStorage {
    state: Arc<Mutex<SimState>>,
}

impl fmt::Debug for SimStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("SimStorage")
            .field("files", &st.names.len())
            .field("syncs", &st.syncs)
            .field("crashed", &st.crashed)
            .finish()
    }
}

fn crashed() -> io::Error {
    io::Error::other("simulated crash: the machine is down")
}

impl Default for SimStorage {
    fn default() -> Self {
        Self::new(Fault::None)
    }
}

impl SimStorage {
    /// An empty file system that fails as `fault` says.
    pub fn new(fault: Fault) -> Self {
        Self {
            state: Arc::new(Mutex::new(SimState {
                next_inode: 1,
                files: HashMap::new(),
                names: BTreeMap::new(),
                durable_names: BTreeMap::new(),
                dirs: Vec::new(),
                fault,
                syncs: 0,
                appends: 0,
                crashed: false,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the simulated crash has happened.
    pub fn has_crashed(&self) -> bool {
        self.lock().crashed
    }

    /// How many syncs (file and directory) have completed.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Ends a [`Fault::FullFrom`]: appends succeed again.
    pub fn free_space(&self) {
        self.lock().fault = Fault::None;
    }

    /// The disk after a power loss now: only durable directory entries, each
    /// file cut to its synced length plus `torn` of the unsynced bytes
    /// (`torn` is a fraction from 0 to 1). The result does not fail.
    pub fn after_crash(&self, torn: f64) -> SimStorage {
        let st = self.lock();
        let mut files = HashMap::new();
        for &inode in st.durable_names.values() {
            if files.contains_key(&inode) {
                continue;
            }
            let f = &st.files[&inode];
            let unsynced = f.data.len() - f.durable_len;
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let kept = f.durable_len + ((unsynced as f64) * torn.clamp(0.0, 1.0)) as usize;
            files.insert(
                inode,
                SimFileData {
                    data: f.data[..kept].to_vec(),
                    durable_len: kept,
                },
            );
        }
        SimStorage {
            state: Arc::new(Mutex::new(SimState {
                next_inode: st.next_inode,
                files,
                names: st.durable_names.clone(),
                durable_names: st.durable_names.clone(),
                dirs: st.dirs.clone(),
                fault: Fault::None,
                syncs: 0,
                appends: 0,
                crashed: false,
            })),
        }
    }

    /// Flips one bit of a file's content (for corruption tests).
    ///
    /// # Panics
    ///
    /// If the file does not exist or is shorter than `byte`.
    pub fn flip_bit(&self, path: &Path, byte: usize, bit: u8) {
        let mut st = self.lock();
        let inode = st.names[path];
        st.files.get_mut(&inode).expect("file exists").data[byte] ^= 1 << (bit % 8);
    }

    /// A file's length, if it exists.
    pub fn file_len(&self, path: &Path) -> Option<usize> {
        let st = self.lock();
        st.names.get(path).map(|i| st.files[i].data.len())
    }

    /// Every file path, sorted.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.lock().names.keys().cloned().collect()
    }
}

#[derive(Debug)]
struct SimFile {
    inode: u64,
    storage: SimStorage,
}

impl Storage for SimStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.lock();
        if st.crashed {
            return Err(crashed());
        }
        // Directories are modelled as always durable: the log syncs the
        // entries it cares about (files) explicitly.
        for ancestor in dir.ancestors() {
            if !st.dirs.iter().any(|d| d == ancestor) {
                st.dirs.push(ancestor.to_path_buf());
            }
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let st = self.lock();
        if st.crashed {
            return Err(crashed());
        }
        if !st.dirs.iter().any(|d| d == dir) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no such directory"));
        }
        let mut names: Vec<String> = st
            .names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .chain(st.dirs.iter().filter(|d| d.parent() == Some(dir)))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let mut st = self.lock();
        if st.crashed {
            return Err(crashed());
        }
        let inode = match st.names.get(path) {
            Some(&inode) => inode,
            None if create => {
                let inode = st.next_inode;
                st.next_inode += 1;
                st.files.insert(inode, SimFileData::default());
                st.names.insert(path.to_path_buf(), inode);
                inode
            }
            None => return Err(io::Error::new(io::ErrorKind::NotFound, "no such file")),
        };
        Ok(Arc::new(SimFile {
            inode,
            storage: self.clone(),
        }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        if st.crashed {
            return Err(crashed());
        }
        st.names
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file"))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.lock();
        if st.crashed {
            return Err(crashed());
        }
        let inode = st
            .names
            .remove(from)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file"))?;
        st.names.insert(to.to_path_buf(), inode);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.lock();
        sim_sync(&mut st)?;
        let current: Vec<(PathBuf, u64)> = st
            .names
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        st.durable_names.retain(|p, _| p.parent() != Some(dir));
        st.durable_names.extend(current);
        Ok(())
    }
}

/// Counts a sync, crashing if it is the chosen one.
fn sim_sync(st: &mut SimState) -> io::Result<()> {
    if st.crashed {
        return Err(crashed());
    }
    if st.fault == Fault::CrashAtSync(st.syncs + 1) {
        st.crashed = true;
        return Err(crashed());
    }
    st.syncs += 1;
    Ok(())
}

impl StorageFile for SimFile {
    fn len(&self) -> io::Result<u64> {
        let st = self.storage.lock();
        if st.crashed {
            return Err(crashed());
        }
        Ok(st.files[&self.inode].data.len() as u64)
    }

    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        let st = self.storage.lock();
        if st.crashed {
            return Err(crashed());
        }
        let data = &st.files[&self.inode].data;
        let pos = usize::try_from(pos).unwrap_or(usize::MAX).min(data.len());
        let n = buf.len().min(data.len() - pos);
        buf[..n].copy_from_slice(&data[pos..pos + n]);
        Ok(n)
    }

    fn append(&self, data: &[u8]) -> io::Result<()> {
        let mut st = self.storage.lock();
        if st.crashed {
            return Err(crashed());
        }
        st.appends += 1;
        if let Fault::FullFrom(k) = st.fault
            && st.appends >= k
        {
            return Err(io::Error::from_raw_os_error(28));
        }
        let fail = st.fault == Fault::FailAppend(st.appends);
        let file = st.files.get_mut(&self.inode).expect("open files exist");
        if fail {
            file.data.extend_from_slice(&data[..data.len() / 2]);
            return Err(io::Error::other("simulated write failure"));
        }
        file.data.extend_from_slice(data);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut st = self.storage.lock();
        sim_sync(&mut st)?;
        let file = st.files.get_mut(&self.inode).expect("open files exist");
        file.durable_len = file.data.len();
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.storage.lock();
        if st.crashed {
            return Err(crashed());
        }
        let file = st.files.get_mut(&self.inode).expect("open files exist");
        let len = usize::try_from(len).map_err(|_| io::Error::other("length too large"))?;
        file.data.resize(len, 0);
        // Modelled as durable at once: the log only ever cuts a tail that
        // recovery would cut again anyway.
        file.durable_len = file.durable_len.min(len);
        Ok(())
    }
}
