//! Pre-flight check of the automation webhook (`check-config --connect`, and the daemon at
//! start): the URL's host resolves and a TCP connection opens, and for `https` a TLS
//! handshake succeeds against the public roots (the certificate is valid for the host).
//! No HTTP request is sent: a receiver may run an automation on any request, and a probe
//! would prove nothing a receiver answers reliably.

use std::sync::Arc;
use std::time::Duration;

use optout_core::Finding;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, pki_types::ServerName};

use crate::client::Sender;

impl Sender {
    pub(crate) async fn preflight(&self) -> Vec<Finding> {
        let url = self.url();
        let host = self.host().to_string();
        let (Some(name), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            return vec![Finding::fail(
                format!("the url has no host ({host})"),
                "set url to the receiver's http(s) address",
            )];
        };
        let name = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let wait = self.timeout().min(Duration::from_secs(10));
        let tcp = match tokio::time::timeout(wait, TcpStream::connect((name.as_str(), port))).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return vec![Finding::fail(
                    format!("cannot connect to {host}:{port}: {e}"),
                    "check the url's host and port, DNS, firewalls and that the receiver runs",
                )];
            }
            Err(_) => {
                return vec![Finding::fail(
                    format!("connecting to {host}:{port} timed out after {wait:?}"),
                    "check the url's host and port, DNS, firewalls and that the receiver runs",
                )];
            }
        };
        if url.scheme() != "https" {
            return vec![Finding::pass(format!(
                "{host}:{port} accepts connections (http: no TLS; nothing sent)"
            ))];
        }
        match tokio::time::timeout(wait, handshake(tcp, &name)).await {
            Ok(Ok(())) => vec![Finding::pass(format!(
                "{host}:{port} accepts TLS connections with a valid certificate (nothing sent)"
            ))],
            Ok(Err(e)) => vec![Finding::fail(
                format!("the TLS handshake with {host}:{port} failed: {e}"),
                "give the receiver a certificate from a public CA valid for this host name",
            )],
            Err(_) => vec![Finding::fail(
                format!("the TLS handshake with {host}:{port} timed out"),
                "check that the port serves TLS",
            )],
        }
    }
}

async fn handshake(tcp: TcpStream, name: &str) -> Result<(), String> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    TlsConnector::from(Arc::new(config))
        .connect(server, tcp)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}
