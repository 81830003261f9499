//! `meshctl certs`: the development PKI of the local mesh. Writes, where absent, a CA and a
//! certificate for every service and for the operator (the identity grpcurl and meshctl present),
//! and says how to call the mesh with them. Existing files are kept, so the CA stays the same
//! across runs and services restarted later still trust each other. Not for production: in a
//! cluster, cert-manager (or the operator's own CA) issues the certificates.

use std::path::{Path, PathBuf};

use anyhow::Context;
use mesh::{identity::SpiffeId, pki, tls::DEFAULT_TRUST_DOMAIN};

/// The namespace of the identities when none is given.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Where `meshctl certs` writes and every other subcommand reads the certificates by default.
pub const DEFAULT_DIR: &str = ".meshwork/certs";
/// Everyone who gets a certificate: the services, then the operator.
pub const NAMES: [&str; 5] = ["users", "auth", "billing", "orders", pki::OPERATOR];
/// The example port in the printed grpcurl command (users' first replica in `meshctl up`).
const EXAMPLE_PORT: u16 = 50051;

#[derive(clap::Args)]
pub struct CertsArgs {
    /// Where the CA, certificates and keys are written.
    #[arg(long, default_value = DEFAULT_DIR)]
    dir: PathBuf,
    /// The trust domain of the SPIFFE identities (`spiffe://<trust domain>/ns/..`).
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// The namespace of the SPIFFE identities (`../ns/<namespace>/sa/<name>`).
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    namespace: String,
}

/// What [`ensure`] found and made.
pub struct Pki {
    /// The directory, absolute.
    pub dir: PathBuf,
    /// Whether the CA was created now (rather than found).
    pub new_ca: bool,
    /// The names whose certificates were issued now.
    pub issued: Vec<String>,
}

/// Writes whatever part of the development PKI in `dir` is missing.
pub fn ensure(dir: &Path, trust_domain: &str, namespace: &str) -> anyhow::Result<Pki> {
    let new_ca = !(dir.join("ca.crt").exists() && dir.join("ca.key").exists());
    let issued = pki::write_dev_pki(dir, trust_domain, namespace, &NAMES)
        .with_context(|| format!("writing the mesh certificates to {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    Ok(Pki {
        dir,
        new_ca,
        issued,
    })
}

/// grpcurl's TLS flags to call the mesh as the operator with the certificates in `dir`.
pub fn grpcurl_flags(dir: &Path) -> String {
    format!(
        "-cacert {} -cert {} -key {}",
        dir.join("ca.crt").display(),
        dir.join(format!("{}.crt", pki::OPERATOR)).display(),
        dir.join(format!("{}.key", pki::OPERATOR)).display(),
    )
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    let pki = ensure(&args.dir, &args.trust_domain, &args.namespace)?;
    let dir = &pki.dir;
    if pki.new_ca {
        println!("wrote the CA: {0}/ca.crt, {0}/ca.key", dir.display());
    } else {
        println!("kept the CA in {}", dir.display());
    }
    for name in NAMES {
        let files = format!("{0}/{name}.crt, {0}/{name}.key", dir.display());
        if pki.issued.iter().any(|issued| issued == name) {
            let identity = SpiffeId::new(&args.trust_domain, &args.namespace, name)?;
            println!("wrote {files} ({identity})");
        } else {
            println!("kept {files}");
        }
    }
    println!();
    println!("Every service port accepts only TLS 1.3 clients with a certificate from this CA.");
    println!("Call the mesh as the operator (admitted by every service), e.g. with grpcurl:");
    println!(
        "  grpcurl {} localhost:{EXAMPLE_PORT} list",
        grpcurl_flags(dir)
    );
    println!("meshctl up and the journey subcommands use this directory with --certs-dir.");
    Ok(())
}
