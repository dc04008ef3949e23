//! Command-line contract of `outpost-signer` (outside checks rely on it: extend, don't change).

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "outpost-signer",
    version,
    about = "Build, sign, verify and publish Outpost release bundles"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create a signing key pair: DIR/outpost.key (encrypted, cosign format) and DIR/outpost.pub.
    Keygen(KeygenArgs),
    /// Build a release bundle (an OCI image layout) from a stack file.
    Build(Box<BuildArgs>),
    /// Add a signature to a bundle (each key holder runs this once).
    Sign(SignArgs),
    /// Attach a signature made elsewhere (HSM, KMS, openssl, cosign) over a payload.
    AttachSignature(AttachArgs),
    /// Print the simple-signing payload to sign for a bundle (for external signers).
    Payload(PayloadArgs),
    /// Verify a bundle against public keys or a trust root.
    Verify(VerifyArgs),
    /// Show a bundle's digest, metadata, resources, images and signatures.
    Inspect(InspectArgs),
    /// Publish a bundle: oci://HOST[:PORT]/REPO[:TAG], dir://PATH or git+URL.
    Push(PushArgs),
    /// Manage the trust root (root.json).
    #[command(subcommand)]
    Root(RootCommand),
    /// Print the JSON Schema of the stack file.
    Schema,
    /// Print shell completions (bash, zsh or fish) for outpost-signer.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) for outpost-signer.
    Man,
}

#[derive(Args)]
pub struct KeygenArgs {
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Overwrite an existing key pair.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct RegistryArgs {
    /// Registry user (else from the docker config file).
    #[arg(long, env = "OUTPOST_REGISTRY_USERNAME")]
    pub username: Option<String>,
    /// Registry password.
    #[arg(long, env = "OUTPOST_REGISTRY_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Docker config file with registry credentials (default ~/.docker/config.json).
    #[arg(long)]
    pub registry_config: Option<PathBuf>,
    /// Talk plain HTTP to the registry (always so for loopback addresses).
    #[arg(long)]
    pub plain_http: bool,
}

#[derive(Args)]
pub struct BuildArgs {
    /// The stack file (YAML).
    pub stack: PathBuf,
    /// Release version (semver).
    #[arg(long)]
    pub version: String,
    /// Rollback counter: strictly increasing per stack and channel.
    #[arg(long)]
    pub sequence: u64,
    #[arg(long, default_value = "stable")]
    pub channel: String,
    /// When the release stops being accepted (RFC 3339). Default: 90 days after `created`.
    #[arg(long)]
    pub expires: Option<String>,
    /// Creation time (RFC 3339). Default: $SOURCE_DATE_EPOCH, else now.
    #[arg(long)]
    pub created: Option<String>,
    /// Put the referenced container images into the bundle (air-gapped sites), images built
    /// from source included.
    #[arg(long)]
    pub with_images: bool,
    /// Where images built from source (`code: {type: source}`) are pushed: HOST[:PORT]/REPO,
    /// each as REPO:<resource>-<version>, pinned by digest in the stack.
    #[arg(long, value_name = "HOST/REPO")]
    pub image_repository: Option<String>,
    /// A registry that base images of source builds are pulled from without TLS (repeatable;
    /// with --plain-http, --image-repository's registry is one).
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,
    /// The buildah that builds source images (daemonless, OCI output).
    #[arg(long, env = "OUTPOST_BUILDAH", default_value = "buildah")]
    pub buildah: PathBuf,
    /// A stateful resource this release migrates in a way the previous release cannot read
    /// (repeatable). Agents show it before approval and, rolling back past this release,
    /// restore the resource's data to the snapshot taken before it.
    #[arg(long = "irreversible", value_name = "RESOURCE")]
    pub irreversible: Vec<String>,
    /// Never contact a registry: unpinned images are an error.
    #[arg(long)]
    pub offline: bool,
    /// A newer root.json for agents to rotate to (repeat for a chain). Each must be a valid
    /// rotation of the one before; an unsigned draft is refused.
    #[arg(long = "root-update")]
    pub root_updates: Vec<PathBuf>,
    /// The root agents trust now: the first --root-update must be a valid rotation of it.
    /// Without it the first must at least be signed by a threshold of its own keys.
    #[arg(long, requires = "root_updates")]
    pub root_previous: Option<PathBuf>,
    /// Write a tar layout to FILE.
    #[arg(long, conflicts_with = "out_dir", required_unless_present = "out_dir")]
    pub out: Option<PathBuf>,
    /// Write a directory layout to DIR.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Plain progress lines instead of bars on a terminal (a line as each large blob starts and
    /// when it is done; on stderr).
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Args)]
pub struct SignArgs {
    /// Bundle (tar file or layout directory); signed in place.
    pub bundle: PathBuf,
    /// Private key (cosign format); password from OUTPOST_PASSWORD, else COSIGN_PASSWORD.
    #[arg(long)]
    pub key: PathBuf,
    /// docker-reference written into the signed payload (default: the stack name).
    #[arg(long)]
    pub reference: Option<String>,
}

#[derive(Args)]
pub struct AttachArgs {
    /// Bundle (tar file or layout directory); changed in place.
    pub bundle: PathBuf,
    /// The simple-signing payload that was signed (see `payload`).
    #[arg(long)]
    pub payload: PathBuf,
    /// The signature: ASN.1 DER, or its base64 (as cosign writes it).
    #[arg(long)]
    pub signature: PathBuf,
}

#[derive(Args)]
pub struct PayloadArgs {
    pub bundle: PathBuf,
    /// docker-reference written into the payload (default: the stack name).
    #[arg(long)]
    pub reference: Option<String>,
    /// Write the payload here instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args)]
pub struct VerifyArgs {
    pub bundle: PathBuf,
    /// Trusted public key (repeatable).
    #[arg(
        long = "key",
        required_unless_present = "root",
        conflicts_with = "root"
    )]
    pub keys: Vec<PathBuf>,
    /// Signatures required from distinct keys (default 1).
    #[arg(long, requires = "keys")]
    pub threshold: Option<usize>,
    /// Pinned trust root.
    #[arg(long)]
    pub root: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

#[derive(Args)]
pub struct InspectArgs {
    pub bundle: PathBuf,
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Args)]
pub struct PushArgs {
    pub bundle: PathBuf,
    /// oci://HOST[:PORT]/REPO[:TAG] (tag defaults to the version), dir://PATH, or
    /// git+URL (file://, https://, git://) with --git-path and --git-branch.
    pub destination: String,
    /// Path of the bundle inside the git repository.
    #[arg(long, default_value = "outpost/bundle.tar")]
    pub git_path: String,
    /// Branch to commit to.
    #[arg(long, default_value = "main")]
    pub git_branch: String,
    /// Plain progress lines instead of bars on a terminal (a line as each large blob starts and
    /// when it is done; on stderr).
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Subcommand)]
pub enum RootCommand {
    /// Create version 1 of a trust root (unsigned; then `root sign` by each key holder).
    Init(RootInitArgs),
    /// Add a signature to a root.json.
    Sign(RootSignArgs),
    /// Create the next version of a root with a new key set (sign it with old and new keys).
    Rotate(RootRotateArgs),
    /// Check a root: self-signed to its threshold, and a valid successor of --previous.
    Verify(RootVerifyArgs),
}

#[derive(Args)]
pub struct RootInitArgs {
    /// Public key trusted by this root (repeatable).
    #[arg(long = "key", required = true)]
    pub keys: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub threshold: usize,
    /// Default: one year from now.
    #[arg(long)]
    pub expires: Option<String>,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct RootSignArgs {
    pub root: PathBuf,
    #[arg(long)]
    pub key: PathBuf,
}

#[derive(Args)]
pub struct RootRotateArgs {
    /// The current root.json.
    pub root: PathBuf,
    /// Public key of the new root (repeatable).
    #[arg(long = "key", required = true)]
    pub keys: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub threshold: usize,
    #[arg(long)]
    pub expires: Option<String>,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct RootVerifyArgs {
    pub root: PathBuf,
    #[arg(long)]
    pub previous: Option<PathBuf>,
}
