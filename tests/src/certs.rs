//! Certificates made for a test with the `openssl` command (make installs it): a CA, the
//! controller's (or any server's) certificate for `localhost` and `127.0.0.1`, a client
//! certificate of the CA, and one of another CA, in a temp dir of their own.

use std::path::PathBuf;
use std::process::Command;

use crate::controller::ControllerTls;
use crate::envoy::UpstreamTls;

/// A CA, the controller's certificate (DNS `localhost`, IP `127.0.0.1`), a client
/// certificate of the CA, and a client certificate of another CA, in a temp dir.
pub struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    pub fn make() -> Certs {
        let dir = tempfile::tempdir().expect("temp dir");
        let certs = Certs { dir };
        certs.ca("ca");
        certs.ca("other-ca");
        certs.issue(
            "ca",
            "server",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        certs.issue("ca", "client", "extendedKeyUsage=clientAuth\n");
        certs.issue("other-ca", "stranger", "extendedKeyUsage=clientAuth\n");
        certs
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn openssl(&self, args: &[&str]) {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run `openssl` ({e}): these tests make their certificates with it (Debian: apt-get install openssl)")
            });
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// `name.pem` and `name.key`: a self-signed CA (P-256).
    fn ca(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN=sluice test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
    }

    /// `name.pem` and `name.key`, issued by the CA `ca` with the extensions `extensions`.
    fn issue(&self, ca: &str, name: &str, extensions: &str) {
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN=sluice test {name}"),
        ]);
        let extfile = format!("{name}.ext");
        std::fs::write(
            self.path(&extfile),
            format!(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n{extensions}"
            ),
        )
        .expect("write extensions");
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-set_serial",
            &std::process::id().to_string(),
            "-days",
            "2",
            "-extfile",
            &extfile,
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    pub fn pair(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.path(&format!("{name}.pem")),
            self.path(&format!("{name}.key")),
        )
    }

    /// The controller's TLS; with `mtls`, client certificates of the CA required (the
    /// harness then presents `client`).
    pub fn controller(&self, mtls: bool) -> ControllerTls {
        ControllerTls {
            cert_file: self.path("server.pem"),
            key_file: self.path("server.key"),
            client_ca_file: mtls.then(|| self.path("ca.pem")),
            ca_file: self.path("ca.pem"),
            client_cert: mtls.then(|| self.pair("client")),
        }
    }

    /// Envoy's TLS to the controller, presenting `client` (`client.pem`, `client.key`).
    pub fn envoy(&self, client: Option<&str>) -> UpstreamTls {
        UpstreamTls {
            ca_file: self.path("ca.pem"),
            server_name: "localhost".to_owned(),
            client_cert: client.map(|name| self.pair(name)),
        }
    }
}
