//! `fake-apiserver --listen 127.0.0.1:PORT --namespace NS`: the in-memory cluster and its
//! controller stand-ins served over plain HTTP, for a real agent process in tests. Prints
//! `listening on ADDRESS` once it accepts connections.

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut listen, mut namespace) = (None, None);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--listen" => listen = args.next(),
            "--namespace" => namespace = args.next(),
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    let (Some(listen), Some(namespace)) = (listen, namespace) else {
        anyhow::bail!("usage: fake-apiserver --listen IP:PORT --namespace NS");
    };
    let client = outpost_kube_stand_in::cluster().await;
    tokio::spawn(outpost_kube_stand_in::run_controllers(
        client.clone(),
        namespace,
    ));
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let client = client.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let client = client.clone();
                async move { Ok::<_, std::convert::Infallible>(forward(&client, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Hands one HTTP request to the in-memory API and its answer back.
async fn forward(client: &kube::Client, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return answer(StatusCode::BAD_REQUEST, e.to_string().into()),
    };
    let request = Request::from_parts(parts, kube::client::Body::from(body.to_vec()));
    match client.send(request).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            match body.collect().await {
                Ok(body) => Response::from_parts(parts, Full::new(body.to_bytes())),
                Err(e) => answer(StatusCode::INTERNAL_SERVER_ERROR, e.to_string().into()),
            }
        }
        Err(e) => answer(StatusCode::INTERNAL_SERVER_ERROR, e.to_string().into()),
    }
}

fn answer(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
}
