//! Test support on top of `bandshare-local` (re-exported: in-process
//! clusters on loopback): processes of the real binary that print the
//! addresses they bound, network namespaces, a mute sharer stream, and
//! logging for tests. A dev-dependency only; nothing here ships.

pub mod process;

pub use bandshare_local::*;

use bandshare_agent::identity;
use bandshare_agent::location::LocationSpec;

/// A sharer stream that says hello and then nothing (answers no ping, no
/// access request), held open while this lives.
pub struct MuteSharer {
    _tx: tokio::sync::mpsc::Sender<bandshare_proto::v1::SharerMessage>,
    _inbound: tonic::Streaming<bandshare_proto::v1::CoordinatorMessage>,
}

impl MuteSharer {
    /// Attaches as sharer `name` at the centre with a relay nobody can dial.
    pub async fn attach(
        url: &bandshare_agent::client::ServerUrl,
        name: &str,
    ) -> anyhow::Result<MuteSharer> {
        use bandshare_proto::v1;
        let ch = bandshare_agent::client::connect(url).await?;
        let mut client = v1::sharer_link_client::SharerLinkClient::new(ch);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let key = identity::generate()?;
        let loc = LocationSpec {
            at: Some(center()),
            ..Default::default()
        };
        tx.send(v1::SharerMessage {
            msg: Some(v1::sharer_message::Msg::Hello(v1::Hello {
                version: 1,
                name: name.into(),
                public_key: key.verifying_key().to_bytes().to_vec(),
                relay_endpoints: vec!["127.0.0.1:9".into()],
                relay_cert_sha256: vec![0; 32],
                location: Some(loc.to_wire()),
                ..Default::default()
            })),
        })
        .await
        .map_err(|_| anyhow::anyhow!("stream closed before hello"))?;
        let inbound = client
            .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(MuteSharer {
            _tx: tx,
            _inbound: inbound,
        })
    }
}
