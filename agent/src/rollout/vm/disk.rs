//! A machine's attached volumes, on the node: finds the block device the cloud attached (by
//! its volume id where the cloud names it so, else by the device name asked for) and gives it
//! an ext4 filesystem when it is blank. A device with any filesystem or partition table other
//! than ext4 is refused, never formatted.

use super::nodes::AttachedVolume;
use std::path::{Path, PathBuf};

/// The node's view of `/dev`.
#[derive(Debug, Clone)]
pub struct Disks {
    /// Where devices are listed by id (`/dev/disk/by-id`).
    pub by_id: PathBuf,
}

impl Disks {
    /// Where the device of `volume` can appear: on Nitro machines (NVMe) under its volume id,
    /// on Xen machines as `/dev/xvdf` for `/dev/sdf`, or under the name asked for.
    fn candidates(&self, volume: &AttachedVolume) -> Vec<PathBuf> {
        let serial = volume.volume.replace('-', "");
        let mut candidates = vec![
            self.by_id
                .join(format!("nvme-Amazon_Elastic_Block_Store_{serial}")),
        ];
        if let Some(letter) = volume.device.strip_prefix("/dev/sd") {
            candidates.push(PathBuf::from(format!("/dev/xvd{letter}")));
        }
        candidates.push(PathBuf::from(&volume.device));
        candidates
    }

    /// The device of `volume` once it has appeared: the node waits for it (a pass at a time)
    /// rather than failing the release, as attaching can take the cloud a while.
    pub fn find(&self, volume: &AttachedVolume) -> Result<PathBuf, String> {
        self.candidates(volume)
            .into_iter()
            .find(|p| p.exists())
            .ok_or_else(|| {
                format!(
                    "volume {} of {}-{} ({}) has not appeared as a device yet",
                    volume.volume, volume.replica.resource, volume.replica.ordinal, volume.device
                )
            })
    }

    /// The device of `volume`, with an ext4 filesystem (made if the device is blank).
    pub async fn prepare(&self, volume: &AttachedVolume) -> Result<PathBuf, String> {
        let name = format!("{}-{}", volume.replica.resource, volume.replica.ordinal);
        let device = self.find(volume)?;
        let in_volume = |e: String| format!("volume {} of {name}: {e}", volume.volume);
        match filesystem(&device).await.map_err(in_volume)? {
            Some(kind) if kind == "ext4" => {}
            Some(kind) => {
                return Err(in_volume(format!(
                    "{} holds {kind}, not ext4: refused (nothing was formatted)",
                    device.display()
                )));
            }
            None => {
                tracing::info!("formatting {} (blank) for {name}", device.display());
                run("mkfs.ext4", &["-q", "-F", "-L", "outpost-data"], &device)
                    .await
                    .map_err(in_volume)?;
            }
        }
        Ok(device)
    }
}

/// What `device` holds: `Some("ext4")`, `Some("partition table dos")`, or `None` when blkid
/// finds nothing (a blank device).
async fn filesystem(device: &Path) -> Result<Option<String>, String> {
    let probed = tokio::process::Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(device)
        .output()
        .await
        .map_err(|e| format!("blkid: {e}"))?;
    match probed.status.code() {
        // blkid's code for "nothing found".
        Some(2) => Ok(None),
        Some(0) => {
            let text = String::from_utf8_lossy(&probed.stdout);
            let field = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(str::to_string)
            };
            Ok(Some(
                field("TYPE=")
                    .or_else(|| field("PTTYPE=").map(|t| format!("partition table {t}")))
                    .unwrap_or_else(|| "something blkid cannot name".into()),
            ))
        }
        _ => Err(format!(
            "blkid {}: {}",
            device.display(),
            String::from_utf8_lossy(&probed.stderr).trim()
        )),
    }
}

async fn run(program: &str, args: &[&str], device: &Path) -> Result<(), String> {
    let done = tokio::process::Command::new(program)
        .args(args)
        .arg(device)
        .output()
        .await
        .map_err(|e| format!("{program}: {e}"))?;
    if done.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            device.display(),
            String::from_utf8_lossy(&done.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::ReplicaId;

    /// A 16 MiB blank device for volume `vol-0abc`, under its NVMe name in `dir`.
    fn volume(dir: &Path) -> (Disks, AttachedVolume, PathBuf) {
        let device = dir.join("nvme-Amazon_Elastic_Block_Store_vol0abc");
        std::fs::File::create(&device)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let disks = Disks {
            by_id: dir.to_path_buf(),
        };
        let volume = AttachedVolume {
            replica: ReplicaId::new("db", 0),
            volume: "vol-0abc".into(),
            device: "/dev/sdf".into(),
        };
        (disks, volume, device)
    }

    #[tokio::test]
    async fn a_blank_device_is_formatted_once_and_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (disks, volume, device) = volume(dir.path());
        assert_eq!(disks.prepare(&volume).await.unwrap(), device);
        assert_eq!(filesystem(&device).await.unwrap().as_deref(), Some("ext4"));
        // Formatted again, it would get a new UUID: it keeps the one it has.
        let uuid = || {
            std::process::Command::new("blkid")
                .args(["-p", "-o", "value", "-s", "UUID"])
                .arg(&device)
                .output()
                .unwrap()
                .stdout
        };
        let before = uuid();
        disks.prepare(&volume).await.unwrap();
        assert_eq!(uuid(), before);
    }

    #[test]
    fn a_device_not_there_yet_is_named_and_found_once_it_appears() {
        let dir = tempfile::tempdir().unwrap();
        let (disks, volume, device) = volume(dir.path());
        std::fs::remove_file(&device).unwrap();
        let error = disks.find(&volume).unwrap_err();
        assert_eq!(
            error,
            "volume vol-0abc of db-0 (/dev/sdf) has not appeared as a device yet"
        );
        std::fs::File::create(&device).unwrap();
        assert_eq!(disks.find(&volume).unwrap(), device);
    }

    #[tokio::test]
    async fn a_device_holding_another_filesystem_is_refused_not_formatted() {
        let dir = tempfile::tempdir().unwrap();
        let (disks, volume, device) = volume(dir.path());
        let made = std::process::Command::new("mkfs.ext2")
            .args(["-q", "-F"])
            .arg(&device)
            .status()
            .unwrap();
        assert!(made.success());
        let error = disks.prepare(&volume).await.unwrap_err();
        assert!(error.contains("holds ext2, not ext4: refused"), "{error}");
        assert_eq!(filesystem(&device).await.unwrap().as_deref(), Some("ext2"));
    }
}
