//! The HTTP side: the listener (plain or TLS), who the caller is (cookie token,
//! bearer header, client certificate, or anonymous on loopback), routing, bounded
//! form bodies, anti-forgery tokens, and the headers every answer carries.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use maud::Markup;
use paddock_auth::Principal;
use paddock_config::Permission;
use paddock_tls::{Protocol, ServerTls};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;

use crate::pages::{self, Page, PageError};
use crate::Web;

/// The cookie a signed-in browser's token is kept in (over TLS, with the `__Host-`
/// prefix, so that no other port or subdomain can set it).
const TOKEN_COOKIE: &str = "paddock_token";
/// The cookie the forms' anti-forgery tokens are bound to.
const FORM_COOKIE: &str = "paddock_form";

/// A cookie's name as this connection uses it.
fn cookie_name(name: &str, secure: bool) -> String {
    if secure {
        format!("__Host-{name}")
    } else {
        name.to_owned()
    }
}

/// Whether a `Host` header names this machine's loopback interface, as a page
/// served anonymously to loopback callers requires: a name that merely resolves
/// there (DNS rebinding) is another site.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
/// The largest form body read.
const MAX_FORM_BYTES: usize = 16 << 10;

/// What the connection says of the caller.
struct Connection {
    peer: Option<SocketAddr>,
    /// The client certificate TLS verified, as DER.
    certificate: Option<Vec<u8>>,
    secure: bool,
}

/// Serves the pages and `/metrics` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    web: Arc<Web>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "the HTTP listener failed to accept");
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let (tls, web) = (tls.clone(), web.clone());
        tokio::spawn(async move {
            let http = hyper::server::conn::http1::Builder::new();
            match tls {
                Some(tls) => {
                    let Some(stream) = tls.accept(stream, Protocol::Http1).await else {
                        return;
                    };
                    let certificate = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|c| c.as_ref().to_vec());
                    let connection = Arc::new(Connection {
                        peer: Some(peer),
                        certificate,
                        secure: true,
                    });
                    let service =
                        service_fn(move |request| answer(web.clone(), connection.clone(), request));
                    let _ = http.serve_connection(TokioIo::new(stream), service).await;
                }
                None => {
                    let connection = Arc::new(Connection {
                        peer: Some(peer),
                        certificate: None,
                        secure: false,
                    });
                    let service =
                        service_fn(move |request| answer(web.clone(), connection.clone(), request));
                    let _ = http.serve_connection(TokioIo::new(stream), service).await;
                }
            }
        });
    }
}

/// Why a caller gets no page.
enum Refusal {
    /// No credentials: the sign-in page.
    SignIn,
    Forbidden(String),
}

fn cookies(request: &Request<Incoming>) -> HashMap<String, String> {
    request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            Some((name.to_owned(), value.to_owned()))
        })
        .collect()
}

fn query(request: &Request<Incoming>) -> HashMap<String, String> {
    form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

impl Web {
    /// Who is calling, from the cookie, the `authorization` header or the client
    /// certificate; anonymous when nothing is configured and the caller may be.
    fn caller(
        &self,
        connection: &Connection,
        cookies: &HashMap<String, String>,
        request: &Request<Incoming>,
    ) -> Result<Arc<Principal>, Refusal> {
        if self.authenticator.is_open() {
            let host = request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            let loopback =
                connection.peer.is_some_and(|p| p.ip().is_loopback()) && loopback_host(host);
            if loopback || self.anonymous_anywhere {
                return self
                    .authenticator
                    .authenticate(None, None)
                    .map_err(|e| Refusal::Forbidden(e.0));
            }
            return Err(Refusal::Forbidden(
                "with no [auth] configured, pages are served to loopback callers only \
                 (or set auth.allow_anonymous when the network is trusted)"
                    .into(),
            ));
        }
        let header_value = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let cookie = cookies
            .get(&cookie_name(TOKEN_COOKIE, connection.secure))
            .filter(|t| !t.is_empty())
            .map(|token| format!("Bearer {token}"));
        let certificate = connection.certificate.as_deref();
        if cookie.is_none() && header_value.is_none() && certificate.is_none() {
            return Err(Refusal::SignIn);
        }
        // A stale cookie does not hide a valid header or certificate.
        let found = [cookie.as_deref(), header_value]
            .into_iter()
            .flatten()
            .find_map(|bearer| {
                self.authenticator
                    .authenticate(Some(bearer), certificate)
                    .ok()
            })
            .or_else(|| self.authenticator.authenticate(None, certificate).ok());
        found.ok_or(Refusal::SignIn)
    }

    /// The anti-forgery token forms carry, bound to the browser's form cookie and
    /// to who is signed in (nobody, for the sign-in form).
    fn form_token(&self, cookie: &str, identity: &str) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.secret);
        hasher.update(cookie.as_bytes());
        hasher.update([0]);
        hasher.update(identity.as_bytes());
        hex::encode(hasher.finalize())
    }
}

/// Compares two strings in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn respond(status: StatusCode, content_type: &str) -> http::response::Builder {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::REFERRER_POLICY, "same-origin")
        .header(header::X_FRAME_OPTIONS, "DENY")
        .header(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        )
        .header(header::CACHE_CONTROL, "no-store")
}

fn html(status: StatusCode, markup: Markup, set_cookies: &[String]) -> Response<Full<Bytes>> {
    let body = Bytes::from(markup.into_string());
    let mut builder = respond(status, "text/html; charset=utf-8");
    for cookie in set_cookies {
        builder = builder.header(header::SET_COOKIE, cookie);
    }
    builder
        .body(Full::new(body))
        .expect("the answer's parts are valid")
}

fn redirect(location: &str, set_cookies: &[String]) -> Response<Full<Bytes>> {
    let mut builder =
        respond(StatusCode::SEE_OTHER, "text/plain").header(header::LOCATION, location);
    for cookie in set_cookies {
        builder = builder.header(header::SET_COOKIE, cookie);
    }
    builder
        .body(Full::new(Bytes::new()))
        .expect("the answer's parts are valid")
}

fn cookie(name: &str, value: &str, secure: bool, max_age: Option<u64>) -> String {
    let mut cookie = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
    if secure {
        cookie.push_str("; Secure");
    }
    if let Some(age) = max_age {
        cookie.push_str(&format!("; Max-Age={age}"));
    }
    cookie
}

/// A form body, read up to [`MAX_FORM_BYTES`].
async fn form(request: Request<Incoming>) -> Result<HashMap<String, String>, PageError> {
    let body = Limited::new(request.into_body(), MAX_FORM_BYTES)
        .collect()
        .await
        .map_err(|_| PageError::BadRequest(format!("a form is at most {MAX_FORM_BYTES} bytes")))?
        .to_bytes();
    Ok(form_urlencoded::parse(&body).into_owned().collect())
}

/// Refuses a form sent from another site: its Origin, when sent, must be this host.
fn same_origin(request: &Request<Incoming>) -> bool {
    let Some(origin) = request.headers().get(header::ORIGIN) else {
        return true;
    };
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    let origin = origin.to_str().unwrap_or("");
    let origin_host = origin.split_once("://").map(|(_, rest)| rest);
    matches!((origin_host, host), (Some(o), Some(h)) if o == h)
}

async fn answer(
    web: Arc<Web>,
    connection: Arc<Connection>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    if path == "/metrics" {
        let handle = paddock_telemetry::metrics();
        handle.run_upkeep();
        let body = Bytes::from(handle.render());
        return Ok(respond(StatusCode::OK, "text/plain; version=0.0.4")
            .body(Full::new(body))
            .expect("the answer's parts are valid"));
    }
    let cookies = cookies(&request);
    // Every browser gets a form cookie, so that any page can carry forms.
    let mut set_cookies = Vec::new();
    let form_cookie_name = cookie_name(FORM_COOKIE, connection.secure);
    let form_cookie = match cookies.get(&form_cookie_name).filter(|c| c.len() == 64) {
        Some(c) => c.clone(),
        None => {
            let fresh = hex::encode(rand::random::<[u8; 32]>());
            set_cookies.push(cookie(&form_cookie_name, &fresh, connection.secure, None));
            fresh
        }
    };
    let method = request.method().clone();

    if path == "/signin" {
        let form_token = web.form_token(&form_cookie, "");
        return Ok(sign_in(&web, &connection, request, &form_token, set_cookies).await);
    }
    let caller = match web.caller(&connection, &cookies, &request) {
        Ok(caller) => caller,
        Err(Refusal::SignIn) => {
            let next: String =
                form_urlencoded::byte_serialize(request.uri().to_string().as_bytes()).collect();
            return Ok(redirect(&format!("/signin?next={next}"), &set_cookies));
        }
        Err(Refusal::Forbidden(why)) => {
            return Ok(html(
                StatusCode::FORBIDDEN,
                pages::error_page("Not allowed", &why),
                &set_cookies,
            ));
        }
    };
    let form_token = web.form_token(&form_cookie, caller.name());
    if !(caller.may_somewhere(Permission::Execute)
        || caller.may_somewhere(Permission::CasRead)
        || caller.may_somewhere(Permission::Admin))
    {
        return Ok(html(
            StatusCode::FORBIDDEN,
            pages::error_page(
                "Not allowed",
                &format!(
                    "{} may not execute, read the CAS or administer anywhere, so there is nothing here for it",
                    caller.name()
                ),
            ),
            &set_cookies,
        ));
    }
    let page = Page {
        web: &web,
        caller: &caller,
        form_token: &form_token,
        signed_in: !web.authenticator.is_open(),
    };
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let query = query(&request);
    let outcome = if method == Method::POST {
        let is_form_post = matches!(segments.as_slice(), ["signout"] | ["worker", _, "command"]);
        if !is_form_post {
            Err(PageError::NotFound(format!("nothing to post to at {path}")))
        } else if !same_origin(&request) {
            Err(PageError::Forbidden("a form from another site".into()))
        } else {
            match form(request).await {
                Err(e) => Err(e),
                Ok(fields) => {
                    let sent = fields.get("form_token").map(String::as_str).unwrap_or("");
                    if !same(sent, &form_token) {
                        Err(PageError::Forbidden(
                            "the form's token is missing or stale: reload the page and try again"
                                .into(),
                        ))
                    } else {
                        match segments.as_slice() {
                            ["signout"] => {
                                let name = cookie_name(TOKEN_COOKIE, connection.secure);
                                let cleared = cookie(&name, "", connection.secure, Some(0));
                                set_cookies.push(cleared);
                                return Ok(redirect("/signin", &set_cookies));
                            }
                            ["worker", name, "command"] => page
                                .command_worker(name, &fields)
                                .await
                                .map(Answer::Redirect),
                            _ => unreachable!("matched above"),
                        }
                    }
                }
            }
        }
    } else if method == Method::GET || method == Method::HEAD {
        match segments.as_slice() {
            [] => page.overview().await.map(Answer::Html),
            ["invocations"] => page.invocations(&query).map(Answer::Html),
            ["invocation", id] => page.invocation(id, &query).map(Answer::Html),
            ["action", hash, size] => page.action(hash, size, &query).await.map(Answer::Html),
            ["tree", hash, size] => page.tree(hash, size, &query).await.map(Answer::Html),
            ["tree", hash, size, "archive"] => page.tree_archive(hash, size, &query).await,
            ["blob", hash, size] => page.blob(hash, size, &query).await,
            ["cas"] => page.cas_form(&query),
            ["workers"] => page.workers().map(Answer::Html),
            ["worker", name] => page.worker(name).map(Answer::Html),
            _ => Err(PageError::NotFound(format!("no page at {path}"))),
        }
    } else {
        Err(PageError::MethodNotAllowed)
    };
    Ok(match outcome {
        Ok(Answer::Html(markup)) => html(StatusCode::OK, markup, &set_cookies),
        Ok(Answer::Redirect(location)) => redirect(&location, &set_cookies),
        Ok(Answer::Download { bytes, filename }) => {
            respond(StatusCode::OK, "application/octet-stream")
                .header(
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{filename}\""),
                )
                .body(Full::new(bytes))
                .expect("the answer's parts are valid")
        }
        Err(error) => {
            let (status, title) = error.status();
            html(
                status,
                pages::error_page(title, &error.to_string()),
                &set_cookies,
            )
        }
    })
}

/// What a page handler answers.
pub enum Answer {
    Html(Markup),
    Redirect(String),
    /// A blob's bytes, as a download (never rendered in the farm's origin).
    Download {
        bytes: Bytes,
        filename: String,
    },
}

/// Decodes `%XX` escapes in a path segment (invalid ones are kept as they are).
fn percent_decode(segment: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(high << 4 | low);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `next` is a path on this site: browsers take `//host` and `/\host` as
/// other sites, so neither may follow the sign-in.
fn is_local_path(next: &str) -> bool {
    next.starts_with('/')
        && !next.starts_with("//")
        && !next.contains('\\')
        && !next.chars().any(char::is_control)
}

/// `GET /signin`: the form; `POST /signin`: checks the token and keeps it in the
/// cookie.
async fn sign_in(
    web: &Web,
    connection: &Connection,
    request: Request<Incoming>,
    form_token: &str,
    mut set_cookies: Vec<String>,
) -> Response<Full<Bytes>> {
    let next = query(&request)
        .get("next")
        .filter(|n| is_local_path(n))
        .cloned()
        .unwrap_or_else(|| "/".to_owned());
    if request.method() != Method::POST {
        return html(
            StatusCode::OK,
            pages::sign_in_page(&next, form_token, None),
            &set_cookies,
        );
    }
    if !same_origin(&request) {
        return html(
            StatusCode::FORBIDDEN,
            pages::error_page("Not allowed", "a form from another site"),
            &set_cookies,
        );
    }
    let fields = match form(request).await {
        Ok(fields) => fields,
        Err(e) => {
            return html(
                StatusCode::BAD_REQUEST,
                pages::error_page("Bad request", &e.to_string()),
                &set_cookies,
            )
        }
    };
    if !same(
        fields.get("form_token").map(String::as_str).unwrap_or(""),
        form_token,
    ) {
        return html(
            StatusCode::FORBIDDEN,
            pages::sign_in_page(&next, form_token, Some("The form was stale; try again.")),
            &set_cookies,
        );
    }
    let token = fields.get("token").map(|t| t.trim()).unwrap_or("");
    let valid = !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_graphic())
        && web
            .authenticator
            .authenticate(Some(&format!("Bearer {token}")), None)
            .is_ok();
    if !valid {
        return html(
            StatusCode::UNAUTHORIZED,
            pages::sign_in_page(
                &next,
                form_token,
                Some("That token is not one this farm knows."),
            ),
            &set_cookies,
        );
    }
    let name = cookie_name(TOKEN_COOKIE, connection.secure);
    set_cookies.push(cookie(&name, token, connection.secure, None));
    redirect(&next, &set_cookies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_escapes_decode_and_broken_ones_stay() {
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn only_loopback_names_are_loopback_hosts() {
        for host in [
            "localhost:8981",
            "127.0.0.1:8981",
            "[::1]:8981",
            "127.0.0.2",
            "LOCALHOST",
        ] {
            assert!(loopback_host(host), "{host}");
        }
        for host in [
            "evil.example:8981",
            "10.0.0.1:8981",
            "",
            "[::2]:1",
            "localhost.evil.example",
        ] {
            assert!(!loopback_host(host), "{host}");
        }
    }

    #[test]
    fn sign_in_leads_only_to_this_site() {
        assert!(is_local_path("/invocation/abc?page=2"));
        assert!(!is_local_path("//evil.example/"));
        assert!(!is_local_path("/\\evil.example/"));
        assert!(!is_local_path("https://evil.example/"));
        assert!(!is_local_path("/\tx"));
    }

    #[test]
    fn strings_compare_equal_only_when_equal() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "ab"));
    }
}
