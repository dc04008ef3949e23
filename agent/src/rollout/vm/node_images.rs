//! The node's side of carried images: the archives of the images its release carried, fetched
//! from the agent into the machine's images directory and checked before they count.

use super::{CarriedImage, IDLE_DOWNLOAD, MAX_ERROR, NodeAgent, refusal};
use crate::runtime::Runtime;
use http_body_util::{BodyExt, Limited};
use hyper::{Method, StatusCode};
use std::collections::BTreeSet;

impl<R: Runtime, F: Fn() -> R> NodeAgent<R, F> {
    /// Fetches the images the release carried that this machine lacks into its images
    /// directory, where the engine backend loads them from; each archive is checked against
    /// the size and SHA-256 the assignment names before it counts. Archives of other images go.
    pub(super) async fn fetch_images(
        &self,
        images: &[CarriedImage],
        token: Option<&str>,
    ) -> Result<(), String> {
        let dir = self.options.state_dir.join("images");
        for image in images {
            let name = format!("carried image sha256:{}", image.digest);
            if !CarriedImage::valid_digest(&image.digest) {
                return Err(format!("{name}: not a digest"));
            }
            if dir.join(format!("{}.id", image.digest)).exists() {
                continue;
            }
            let token = token.ok_or_else(|| format!("{name}: waiting to reach the agent"))?;
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let partial = dir.join(format!(".{}.partial", image.digest));
            let fetched = self.download(image, token, &partial).await;
            if let Err(e) = fetched {
                let _ = std::fs::remove_file(&partial);
                return Err(format!("{name}: {e}"));
            }
            let archive = dir.join(format!("{}.tar", image.digest));
            std::fs::rename(&partial, &archive).map_err(|e| format!("{name}: {e}"))?;
            outpost_bundle_format::layout::write_atomic(
                &dir.join(format!("{}.id", image.digest)),
                image.id.as_bytes(),
            )
            .map_err(|e| format!("{name}: {e}"))?;
            tracing::info!("{name}: fetched from the agent ({} bytes)", image.size);
        }
        // Archives of other images go, once per change of the set (not every pass).
        let wanted: BTreeSet<String> = images.iter().map(|i| i.digest.clone()).collect();
        if let Ok(mut pruned) = self.pruned_for.lock()
            && *pruned != Some(wanted.clone())
        {
            crate::runtime::carried::prune_bundled_images(&dir, &wanted);
            *pruned = Some(wanted);
        }
        Ok(())
    }

    /// One carried image's archive into `into`, checked.
    async fn download(
        &self,
        image: &CarriedImage,
        token: &str,
        into: &std::path::Path,
    ) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        let path = format!("/v1/images/{}.tar", image.digest);
        let response = tokio::time::timeout(
            IDLE_DOWNLOAD,
            self.send(&Method::GET, &path, Some(token), None),
        )
        .await
        .map_err(|_| "no answer in time".to_string())?
        .map_err(|e| e.to_string())?;
        let status = response.status();
        if status != StatusCode::OK {
            let answer = Limited::new(response.into_body(), MAX_ERROR)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(refusal(&Method::GET, &path, status, &answer).to_string());
        }
        let mut body = response.into_body();
        let mut file = tokio::fs::File::create(into)
            .await
            .map_err(|e| format!("{}: {e}", into.display()))?;
        let mut written = 0u64;
        loop {
            let frame = tokio::time::timeout(IDLE_DOWNLOAD, body.frame())
                .await
                .map_err(|_| format!("nothing received for {}s", IDLE_DOWNLOAD.as_secs()))?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| e.to_string())?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            written += data.len() as u64;
            if written > image.size {
                return Err(format!("larger than its {} bytes", image.size));
            }
            file.write_all(&data)
                .await
                .map_err(|e| format!("{}: {e}", into.display()))?;
        }
        if written != image.size {
            return Err(format!("cut short: {written} of {} bytes", image.size));
        }
        file.sync_all()
            .await
            .map_err(|e| format!("{}: {e}", into.display()))?;
        let at = into.to_path_buf();
        let sha256 = tokio::task::spawn_blocking(move || crate::rollout::vm::file_sha256(&at))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if sha256 != image.sha256 {
            return Err(format!(
                "SHA-256 {sha256} is not the {} the agent named",
                image.sha256
            ));
        }
        Ok(())
    }
}
