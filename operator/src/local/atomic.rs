//! Writes a single file (a node's `node.toml`), or a set of files into a directory the way kubelet
//! updates a ConfigMap volume, so a reader never sees half of an update. For the set: the files
//! go into a fresh hidden directory (`..<timestamp>`), the `..data` symlink is switched to it with
//! one `rename`, and each visible name is a symlink through `..data`. The node reads its assets
//! from disk per request, so it serves the new files at once, without a restart.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::symlink;
use std::path::Path;

const DATA_LINK: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

/// The files currently visible through `..data` (empty when the directory was never written).
pub fn read(dir: &Path) -> io::Result<BTreeMap<String, Vec<u8>>> {
    let data = dir.join(DATA_LINK);
    let mut files = BTreeMap::new();
    let entries = match std::fs::read_dir(&data) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(files),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        files.insert(name, std::fs::read(entry.path())?);
    }
    Ok(files)
}

/// Makes `dir` hold exactly `files`; returns whether anything changed. The names must be plain
/// file names (the operator's validation guarantees it: no `/`, not starting with `..`).
pub fn write(dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> io::Result<bool> {
    std::fs::create_dir_all(dir)?;
    if read(dir)? == *files && dir.join(DATA_LINK).exists() {
        return Ok(false);
    }
    let old_target = std::fs::read_link(dir.join(DATA_LINK)).ok();
    let stamp = jiff::Timestamp::now().strftime("..%Y_%m_%d_%H_%M_%S.%f").to_string();
    let fresh = dir.join(&stamp);
    std::fs::create_dir(&fresh)?;
    for (name, content) in files {
        std::fs::write(fresh.join(name), content)?;
    }
    // A leftover from an interrupted update would make the symlink call fail.
    let tmp = dir.join(DATA_TMP);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    symlink(&stamp, &tmp)?;
    // The atomic step: readers see either the old or the new set, never a mix.
    std::fs::rename(&tmp, dir.join(DATA_LINK))?;
    for name in files.keys() {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(Path::new(DATA_LINK).join(name), &link)?;
        }
    }
    // Visible names whose file is gone from `..data` are dangling now; remove them.
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !files.contains_key(&name) && entry.file_type()?.is_symlink() {
            std::fs::remove_file(entry.path())?;
        }
    }
    if let Some(old) = old_target.filter(|old| old.as_os_str() != stamp.as_str()) {
        std::fs::remove_dir_all(dir.join(old))?;
    }
    Ok(true)
}

/// Replaces one file so that a reader sees the old or the new content, never a part: the
/// new content goes to a temporary file beside it, then one `rename` puts it in place.
pub fn write_file(path: &Path, content: &[u8]) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| io::Error::other(format!("{} names no file", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec())).collect()
    }

    #[test]
    fn swaps_the_whole_set_through_data_link() {
        let dir = tempfile::tempdir().unwrap();
        let assets = dir.path().join("assets");
        assert!(write(&assets, &files(&[("a.txt", "1"), ("b.css", "x")])).unwrap());
        assert_eq!(std::fs::read_to_string(assets.join("a.txt")).unwrap(), "1");
        assert!(std::fs::symlink_metadata(assets.join("a.txt")).unwrap().file_type().is_symlink());
        assert!(!write(&assets, &files(&[("a.txt", "1"), ("b.css", "x")])).unwrap(), "unchanged");

        assert!(write(&assets, &files(&[("a.txt", "2"), ("c.svg", "<svg/>")])).unwrap());
        assert_eq!(std::fs::read_to_string(assets.join("a.txt")).unwrap(), "2");
        assert_eq!(std::fs::read_to_string(assets.join("c.svg")).unwrap(), "<svg/>");
        assert!(std::fs::symlink_metadata(assets.join("b.css")).is_err(), "removed name is gone");
        assert_eq!(read(&assets).unwrap(), files(&[("a.txt", "2"), ("c.svg", "<svg/>")]));
        // One timestamped directory, the link, and the visible names: old data was cleaned up.
        let hidden: Vec<String> = std::fs::read_dir(&assets)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("..") && n != DATA_LINK)
            .collect();
        assert_eq!(hidden.len(), 1, "{hidden:?}");

        assert!(write(&assets, &BTreeMap::new()).unwrap());
        assert!(read(&assets).unwrap().is_empty());
    }

    #[test]
    fn replaces_a_single_file_without_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        write_file(&path, b"size = 3").unwrap();
        write_file(&path, b"size = 5").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "size = 5");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "the temporary file is gone");
    }
}
