//! How a machine becomes a node: the user data (cloud-init) it boots with, the bootstrap
//! secret it joins with, the SHA-256 of the node binary it checks, and the hash of the machine
//! settings that says when a machine is out of date.

use crate::config::PoolConfig;

/// How a machine's user data starts its node agent: where the agent is, what its binary's
/// SHA-256 is, and the secret to join with.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub advertise: String,
    pub binary_sha256: String,
    pub secret: String,
}

impl Bootstrap {
    /// The cloud-init shell script every machine of `pool` boots with. It fetches the node
    /// binary from the agent (no internet needed), checks its SHA-256, and runs `node` under
    /// systemd where there is one. `OUTPOST_NODE_DIR` and `OUTPOST_INSTANCE_ID` let a test host
    /// run it without root or an instance metadata service.
    pub fn user_data(&self, settings: &str) -> String {
        format!(
            r#"#!/bin/sh
# outpost node bootstrap, made by outpost-agent (machine settings {settings})
set -eu
umask 077
AGENT='{agent}'
DIR="${{OUTPOST_NODE_DIR:-/var/lib/outpost-node}}"
mkdir -p "$DIR"
printf '%s' '{secret}' > "$DIR/bootstrap-secret"
curl -fsS --retry 60 --retry-delay 2 --retry-connrefused -o "$DIR/outpost-agent.new" "$AGENT/v1/binary"
echo "{sha}  $DIR/outpost-agent.new" | sha256sum -c - >/dev/null
chmod 0755 "$DIR/outpost-agent.new"
mv "$DIR/outpost-agent.new" "$DIR/outpost-agent"
if [ -z "${{OUTPOST_INSTANCE_ID:-}}" ]; then
  TOKEN=$(curl -fsS -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' http://169.254.169.254/latest/api/token)
  OUTPOST_INSTANCE_ID=$(curl -fsS -H "X-aws-ec2-metadata-token: $TOKEN" http://169.254.169.254/latest/meta-data/instance-id)
fi
set -- "$DIR/outpost-agent" node --agent "$AGENT" --instance-id "$OUTPOST_INSTANCE_ID" --settings '{settings}' --bootstrap-secret-file "$DIR/bootstrap-secret" --state-dir "$DIR/state"
if [ -z "${{OUTPOST_NODE_DIR:-}}" ] && [ -d /run/systemd/system ]; then
  cat > /etc/systemd/system/outpost-node.service <<UNIT
[Unit]
Description=Outpost node agent
After=network-online.target docker.service
[Service]
ExecStart=$*
Restart=always
RestartSec=2
[Install]
WantedBy=multi-user.target
UNIT
  systemctl daemon-reload
  exec systemctl enable --now outpost-node.service
fi
exec "$@"
"#,
            agent = self.advertise,
            secret = self.secret,
            sha = self.binary_sha256,
        )
    }
}

/// The secret machines join with: read from `file`, or made (0600) when it does not exist.
pub fn bootstrap_secret(file: &std::path::Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(file) {
        Ok(text) if text.trim().len() >= 32 => Ok(text.trim().to_string()),
        Ok(_) => anyhow::bail!(
            "vm.nodes.bootstrap_secret_file {}: shorter than 32 characters",
            file.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = outpost_bundle_format::crypto::random_secret()?;
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir)?;
            }
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            out.write_all(secret.as_bytes())?;
            out.sync_all()?;
            Ok(secret)
        }
        Err(e) => anyhow::bail!("vm.nodes.bootstrap_secret_file {}: {e}", file.display()),
    }
}

/// The SHA-256 of a file, as hex (the node binary machines check).
pub fn file_sha256(path: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Read;
    let mut file =
        std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut hasher = outpost_bundle_format::crypto::Sha256::default();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher.finish().iter().map(|b| format!("{b:02x}")).collect())
}

/// The machine settings' identity: a machine launched with other settings is replaced.
pub fn settings_hash(pool: &PoolConfig) -> String {
    let text = serde_json::to_string(pool).unwrap_or_default();
    let hash = outpost_bundle_format::crypto::sha256(text.as_bytes());
    hash[..6].iter().map(|b| format!("{b:02x}")).collect()
}
