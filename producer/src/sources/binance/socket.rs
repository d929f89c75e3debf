//! One WebSocket connection: opened, read and reported to the manager until
//! it closes.

use super::*;

/// One WebSocket connection: waits `delay`, connects, forwards parsed frames,
/// answers pings (tungstenite queues the pong and sends it on the next read),
/// and reports when it ends.
pub(super) async fn connection(
    id: u64,
    url: String,
    delay: Duration,
    watchdog: Duration,
    venue: String,
    tx: mpsc::Sender<(u64, Report)>,
) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let connect = tokio::time::timeout(Duration::from_secs(15), tokio_tungstenite::connect_async(url.as_str()));
    let mut ws = match connect.await {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => {
            let _ = tx.send((id, Report::Closed(format!("connect failed: {e}")))).await;
            return;
        }
        Err(_) => {
            let _ = tx.send((id, Report::Closed("connect timed out".into()))).await;
            return;
        }
    };
    if tx.send((id, Report::Opened)).await.is_err() {
        return;
    }
    let why = loop {
        let msg = match tokio::time::timeout(watchdog, ws.next()).await {
            Err(_) => break format!("silent for {} s (watchdog)", watchdog.as_secs()),
            Ok(None) => break "closed by the server".to_owned(),
            Ok(Some(Err(e))) => break format!("read failed: {e}"),
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Text(text) => {
                let origin = Origin {
                    venue: &venue,
                    source: RecordSource::Binance,
                    ingest_time: now_micros(),
                };
                let parsed = parse::ws_message(&text, origin);
                if tx.send((id, Report::Frame(parsed, text))).await.is_err() {
                    return;
                }
            }
            Message::Binary(b) => {
                let text = String::from_utf8_lossy(&b).into_owned();
                let parsed = Err("binary frame: Binance sends text".to_owned());
                if tx.send((id, Report::Frame(parsed, text.into()))).await.is_err() {
                    return;
                }
            }
            Message::Close(frame) => break format!("close frame: {frame:?}"),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    };
    let _ = ws.close(None).await;
    let _ = tx.send((id, Report::Closed(why))).await;
}
