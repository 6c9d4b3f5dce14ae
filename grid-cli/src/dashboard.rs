//! `grid dashboard` (and the one `grid up` serves): a live web view of a grid.
//!
//! It reads what the CLI reads — job records, node heartbeats and tallies, the usage ledger —
//! with the credentials it was given, so NATS's permissions decide what it shows: a tenant's
//! credentials show that tenant's jobs and usage; the operator's show every tenant. One
//! sampler builds a snapshot every second; the page gets it over server-sent events
//! (`/api/events`), and `/api/state` answers the same JSON once. `/api/jobs/ID` adds a job's
//! failed tasks with their reasons and the tails of their logs. The page is one HTML file
//! compiled into the binary: nothing is fetched from elsewhere.
//!
//! Throughput is the change, between samples, of the tasks that ended in the jobs shown; the
//! page charts the last five minutes of it.
//!
//! # Who may look
//!
//! The dashboard reads with the credentials it was given — the operator's, under `grid up` —
//! so whoever can reach its port could read what they read, every tenant's jobs and logs. It
//! asks for a token, Jupyter's way: it prints `http://127.0.0.1:PORT/?token=TOKEN` (32 random
//! bytes, or `--token`/`GRID_DASHBOARD_TOKEN` for scripts); the first request with the right
//! `?token=` gets an HttpOnly, SameSite=Strict cookie and a redirect to the same address
//! without the token, and later requests show the cookie, an `Authorization: Bearer TOKEN`
//! header, or `?token=` again (an `/api/` request with it is answered at once, for scripts).
//! Any other request, to any path, gets 401 and a line on how to get in; tokens are compared
//! by their SHA-256, so the time taken says nothing about how much of one was right.
//!
//! A request must also name this dashboard in its `Host`: a web page the user visits cannot
//! then point a name of its own at this address (DNS rebinding) and read the grid through
//! the user's browser. The names allowed, with the dashboard's port: the listen address;
//! `localhost`, `127.0.0.1` and `[::1]` on loopback or all interfaces; the machine's hostname
//! beyond loopback; any IP address on all interfaces (a rebinding page has a name, never an
//! IP literal); and any name added with `--allow-host`.
//!
//! Not covered: a browser sends a host's cookies to every port of it, so a web server of
//! another user on this machine that the browser visits sees the cookie (named per port, so
//! dashboards do not clash). Nor is anything encrypted: beyond loopback, put it behind TLS.
//!
//! Job records are followed, not re-read: one read of `grid_jobs`, then each record as the
//! broker writes it, so a snapshot costs the grid nothing however many jobs it holds. A deleted
//! job's record is purged, which a follower does not see: the broker says so on the job's
//! events subject, and the table is read anew every [`RESYNC`] in case that word was lost.

use anyhow::{Context, Result, anyhow, bail};
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use grid_client::Grid;
use grid_proto::{JobRecord, TaskRecord, TaskState, decode, names};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const PAGE: &str = include_str!("dashboard.html");
/// Jobs shown, newest first.
const JOBS_SHOWN: usize = 100;
/// Throughput samples kept: five minutes, one a second.
const HISTORY: usize = 300;
/// With no page open, a snapshot every this many seconds (for `/api/state`).
const IDLE_EVERY: u64 = 5;
/// Failed tasks listed on a job's page, and the bytes of each log shown.
const FAILED_SHOWN: usize = 50;
const LOG_TAIL: usize = 2048;
/// One read of the grid for a snapshot, at most: a stuck read must not freeze the page.
const PASS_LIMIT: Duration = Duration::from_secs(10);
/// How often the followed job table is read anew (see the module docs).
const RESYNC: Duration = Duration::from_secs(60);

/// The job records shown, as [`follow_jobs`] keeps them.
type JobTable = Arc<std::sync::Mutex<FollowedJobs>>;

#[derive(Default)]
struct FollowedJobs {
    /// By job id; `None` until the first read of them all is in.
    shown: Option<BTreeMap<String, Arc<JobRecord>>>,
    /// Jobs the broker said it deleted since the last full read: a record of theirs still on
    /// its way to the follower must not bring them back.
    deleted: std::collections::HashSet<String>,
}

/// What the dashboard reads: the grid, and whose jobs (`None`: every tenant's).
#[derive(Clone)]
pub struct Source {
    pub grid: Grid,
    pub tenant: Option<String>,
}

#[derive(Clone)]
struct AppState {
    source: Source,
    jobs: JobTable,
    snapshot: watch::Receiver<Arc<String>>,
}

/// Serves the dashboard on `listener` to those `access` lets in, until the future is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    source: Source,
    access: Access,
) -> Result<()> {
    let (tx, rx) = watch::channel(Arc::new(String::from("{}")));
    let jobs = JobTable::default();
    tokio::spawn(follow_jobs(source.clone(), jobs.clone()));
    tokio::spawn(sample(source.clone(), jobs.clone(), tx));
    let app = axum::Router::new()
        .route("/", get(page))
        .route("/api/state", get(state))
        .route("/api/events", get(events))
        .route("/api/jobs/{id}", get(job))
        .with_state(AppState {
            source,
            jobs,
            snapshot: rx,
        })
        // Every route and the fallback: nothing is answered before the check.
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(access),
            guard,
        ));
    axum::serve(listener, app)
        .await
        .context("serving the dashboard")
}

/// Who may read the dashboard: the token, and the `Host` values it answers to (see the module
/// docs).
pub struct Access {
    token: String,
    /// `host:port`, lowercase.
    hosts: Vec<String>,
    /// Any IP address with the dashboard's port (served beyond loopback).
    any_ip: bool,
    port: u16,
    /// The cookie's name: one per port, as a browser sends a host's cookies to all its ports.
    cookie: String,
}

impl Access {
    /// For a dashboard listening on `addr`, with `token` (see [`token`]), also answering to
    /// the names in `allow_hosts`.
    pub fn new(addr: std::net::SocketAddr, token: String, allow_hosts: &[String]) -> Self {
        let (ip, port) = (addr.ip(), addr.port());
        let mut hosts = vec![addr.to_string()];
        if ip.is_loopback() || ip.is_unspecified() {
            hosts.extend([
                format!("localhost:{port}"),
                format!("127.0.0.1:{port}"),
                format!("[::1]:{port}"),
            ]);
        }
        if !ip.is_loopback()
            && let Some(name) = hostname()
        {
            hosts.push(format!("{name}:{port}"));
        }
        hosts.extend(allow_hosts.iter().map(|name| with_port(name, port)));
        for host in &mut hosts {
            host.make_ascii_lowercase();
        }
        Self {
            token,
            hosts,
            any_ip: ip.is_unspecified(),
            port,
            cookie: format!("grid-dashboard-{port}"),
        }
    }

    /// The address to open, token included. An unspecified listen address is shown as the
    /// loopback one of its family: a browser here reaches it there.
    pub fn url(&self, addr: std::net::SocketAddr) -> String {
        let mut shown = addr;
        if addr.ip().is_unspecified() {
            let loopback = match addr.ip() {
                std::net::IpAddr::V4(_) => std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
                std::net::IpAddr::V6(_) => std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            };
            shown.set_ip(loopback);
        }
        format!("http://{shown}/?token={}", self.token)
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.hosts.contains(&host)
            || (self.any_ip
                && host
                    .parse::<std::net::SocketAddr>()
                    .is_ok_and(|a| a.port() == self.port))
    }

    fn grants(&self, offered: &str) -> bool {
        same_secret(offered.as_bytes(), self.token.as_bytes())
    }

    /// The token the request's cookie of this dashboard carries, if any.
    fn cookie_in<'a>(&self, headers: &'a axum::http::HeaderMap) -> Option<&'a str> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, _)| *name == self.cookie)
            .map(|(_, value)| value)
    }

    fn set_cookie(&self) -> String {
        format!(
            "{}={}; HttpOnly; SameSite=Strict; Path=/",
            self.cookie, self.token
        )
    }
}

/// The dashboard's token: `chosen` (`--token`, `GRID_DASHBOARD_TOKEN`) when given, else 32
/// random bytes from the system, in hex.
pub fn token(chosen: Option<&str>) -> Result<String> {
    if let Some(token) = chosen {
        // It goes in a URL and a cookie as it is.
        let url_safe = |b: u8| b.is_ascii_alphanumeric() || b"-_.~".contains(&b);
        if token.len() < 16 || !token.bytes().all(url_safe) {
            bail!(
                "use at least 16 characters of A-Z, a-z, 0-9, '-', '_', '.' and '~' (or leave \
                 it out, and GRID_DASHBOARD_TOKEN unset, for a random one)"
            );
        }
        return Ok(token.to_string());
    }
    use rand::TryRng;
    let mut bytes = [0u8; 32];
    rand::rngs::SysRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| anyhow!("making the dashboard's token: {e}"))?;
    let mut hex = String::with_capacity(2 * bytes.len());
    for b in bytes {
        use std::fmt::Write as _;
        let _ = write!(hex, "{b:02x}");
    }
    Ok(hex)
}

/// Whether two secrets are equal, in a time that does not depend on where they differ: their
/// SHA-256 digests are compared whole.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// This machine's name, as others may reach it.
fn hostname() -> Option<String> {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_str().ok()?;
    (!name.is_empty()).then(|| name.to_string())
}

/// `name` as a `Host` value: with the dashboard's port unless it has one.
fn with_port(name: &str, port: u16) -> String {
    if name.parse::<std::net::SocketAddr>().is_ok() {
        return name.to_string();
    }
    if let Ok(std::net::IpAddr::V6(ip)) = name.parse::<std::net::IpAddr>() {
        return format!("[{ip}]:{port}");
    }
    match name.rsplit_once(':') {
        Some((host, p)) if !host.contains(':') && p.parse::<u16>().is_ok() => name.to_string(),
        _ => format!("{name}:{port}"),
    }
}

/// `?token=` of a query string, if there.
fn token_in_query(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| *name == "token")
        .map(|(_, value)| value)
}

/// Where the redirect after a `?token=` goes: the same path and query, without the token.
fn without_token(uri: &Uri) -> String {
    // `//host` would be another site's address.
    let path = if uri.path().starts_with("//") {
        "/"
    } else {
        uri.path()
    };
    let rest: Vec<&str> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty() && pair.split('=').next() != Some("token"))
        .collect();
    if rest.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", rest.join("&"))
    }
}

const LOGIN_HINT: &str = "This dashboard needs its token: open the URL `grid up` printed, with \
its ?token=..., or run `grid dashboard` to get a new one.";

/// Lets a request in only for an allowed `Host` and with the token (see the module docs).
async fn guard(
    State(access): State<Arc<Access>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !access.host_allowed(host) {
        return (
            StatusCode::FORBIDDEN,
            "unknown host: open the URL the dashboard printed, or serve it with --allow-host NAME\n",
        )
            .into_response();
    }
    let uri = request.uri();
    let api = uri.path().starts_with("/api/");
    if token_in_query(uri.query()).is_some_and(|t| access.grants(t)) {
        // A page: keep the token out of the address bar and the history, in a cookie.
        let method = request.method();
        if !api && (*method == Method::GET || *method == Method::HEAD) {
            let to = without_token(uri);
            return (
                [(header::SET_COOKIE, access.set_cookie())],
                Redirect::to(&to),
            )
                .into_response();
        }
        return next.run(request).await;
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    let cookie = access.cookie_in(headers);
    if bearer.is_some_and(|t| access.grants(t.trim())) || cookie.is_some_and(|t| access.grants(t)) {
        return next.run(request).await;
    }
    let (kind, body) = if api {
        ("text/plain; charset=utf-8", format!("{LOGIN_HINT}\n"))
    } else {
        (
            "text/html; charset=utf-8",
            format!(
                "<!doctype html><meta charset=\"utf-8\"><title>Grid dashboard</title>\
                 <p>{}</p>\n",
                LOGIN_HINT.replace('`', "")
            ),
        )
    };
    (
        StatusCode::UNAUTHORIZED,
        [
            (header::CONTENT_TYPE, kind),
            (header::WWW_AUTHENTICATE, "Bearer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE)
}

async fn state(State(app): State<AppState>) -> impl IntoResponse {
    let body = app.snapshot.borrow().as_str().to_string();
    ([(header::CONTENT_TYPE, "application/json")], body)
}

async fn events(
    State(app): State<AppState>,
) -> Sse<impl futures::Stream<Item = Result<Event, std::convert::Infallible>>> {
    let stream =
        futures::stream::unfold((app.snapshot.clone(), true), |(mut rx, first)| async move {
            if !first && rx.changed().await.is_err() {
                return None;
            }
            let data = rx.borrow_and_update().as_str().to_string();
            Some((Ok(Event::default().data(data)), (rx, false)))
        });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn job(State(app): State<AppState>, Path(id): Path<String>) -> Response {
    match job_detail(&app.source, &app.jobs, &id).await {
        Ok(Some(v)) => {
            ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
        }
        Ok(None) => (StatusCode::NOT_FOUND, format!("no job {id} here")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response(),
    }
}

/// The job's status (as `grid status --json` prints it), and its failed tasks.
async fn job_detail(source: &Source, jobs: &JobTable, id: &str) -> Result<Option<Value>> {
    if !names::valid_name(id) {
        return Ok(None);
    }
    let record = match &source.tenant {
        // A tenant's job is one key away.
        Some(tenant) => source
            .grid
            .jobs()
            .await?
            .get(names::job_key(tenant, id))
            .await
            .map_err(|e| anyhow!("reading job {id}: {e}"))?
            .and_then(|bytes| decode::<JobRecord>(&bytes).ok()),
        None => {
            let followed = lock(jobs).shown.as_ref().map(|jobs| jobs.get(id).cloned());
            match followed {
                Some(record) => record.map(|r| (*r).clone()),
                None => read_jobs(source).await?.remove(id).map(|r| (*r).clone()),
            }
        }
    };
    let Some(record) = record else {
        return Ok(None);
    };
    let tenant = &record.spec.tenant;
    let mut failed = Vec::new();
    if record.counts.failed + record.counts.disputed > 0 {
        let prefix = format!("{tenant}.{id}");
        for (_, bytes) in source
            .grid
            .entries(names::TASKS_BUCKET, Some(&prefix))
            .await?
        {
            let Ok(task) = decode::<TaskRecord>(&bytes) else {
                continue;
            };
            if !crate::status::failed_now(&task, &record) {
                continue;
            }
            let mut logs = serde_json::Map::new();
            for (name, sha) in [
                ("stdout", task.result.stdout),
                ("stderr", task.result.stderr),
            ] {
                // The tail only: a log may be megabytes, and a page lists many.
                if let Some(sha) = sha
                    && let Ok(Some(tail)) =
                        source.grid.get_object_tail(tenant, &sha, LOG_TAIL).await
                {
                    logs.insert(name.into(), String::from_utf8_lossy(&tail).into());
                }
            }
            failed.push(json!({
                "index": task.result.index,
                "state": task_state(task.state),
                "reason": task.result.failure(),
                "attempts": task.attempts,
                "failures": task.failures,
                "node": task.result.node_id,
                "logs": logs,
            }));
            if failed.len() >= FAILED_SHOWN {
                break;
            }
        }
    }
    let mut v = crate::status::status_json(&record);
    v["tenant"] = json!(tenant);
    v["module"] = json!(record.spec.module_name);
    v["failed_tasks"] = json!(failed);
    Ok(Some(v))
}

fn task_state(state: TaskState) -> &'static str {
    match state {
        TaskState::Succeeded => "succeeded",
        TaskState::Failed => "failed",
        TaskState::Disputed => "disputed",
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Every job record shown, by id: one read.
async fn read_jobs(source: &Source) -> Result<BTreeMap<String, Arc<JobRecord>>> {
    Ok(source
        .grid
        .entries(names::JOBS_BUCKET, source.tenant.as_deref())
        .await?
        .into_iter()
        .filter_map(|(_, bytes)| decode::<JobRecord>(&bytes).ok())
        .map(|record| (record.id.clone(), Arc::new(record)))
        .collect())
}

/// Keeps `table` up to date with `grid_jobs` (see the module docs).
async fn follow_jobs(source: Source, table: JobTable) {
    use futures::StreamExt;
    // Deletions, from the broker (a tenant may hear its own jobs' events only).
    let events = names::job_events(source.tenant.as_deref().unwrap_or("*"), "*");
    let mut deleted = match source.grid.client.subscribe(events).await {
        Ok(events) => Some(events),
        Err(e) => {
            tracing::warn!("dashboard: hearing of deleted jobs: {e}");
            None
        }
    };
    loop {
        let follow = follow_jobs_once(&source, &table);
        tokio::pin!(follow);
        let resync = tokio::time::sleep(RESYNC);
        tokio::pin!(resync);
        loop {
            tokio::select! {
                () = &mut resync => break,
                ended = &mut follow => {
                    if let Err(e) = ended {
                        tracing::warn!("dashboard: following the jobs: {e:#}");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
                Some(event) = async { deleted.as_mut()?.next().await } => {
                    if event.payload.as_ref() == names::JOB_DELETED
                        && let Some(id) = event.subject.as_str().rsplit('.').next()
                    {
                        let mut table = lock(&table);
                        table.deleted.insert(id.to_string());
                        if let Some(jobs) = table.shown.as_mut() {
                            jobs.remove(id);
                        }
                    }
                }
            }
        }
    }
}

/// One read of every job record into `table`, then each change until the follow fails.
async fn follow_jobs_once(source: &Source, table: &JobTable) -> Result<()> {
    let mut reader = source
        .grid
        .kv_follow(
            names::JOBS_BUCKET,
            source.tenant.as_deref(),
            async_nats::jetstream::consumer::DeliverPolicy::LastPerSubject,
        )
        .await?;
    // The first read goes to a table of its own, swapped in whole: a snapshot never sees a
    // part of the jobs (their counts are the throughput).
    let mut first = Some(BTreeMap::new());
    // Swaps the first read in, without the jobs deleted while it went on.
    let swap = |table: &mut FollowedJobs, mut jobs: BTreeMap<String, Arc<JobRecord>>| {
        jobs.retain(|id, _| !table.deleted.contains(id));
        table.deleted.clear();
        table.shown = Some(jobs);
    };
    if reader.caught_up {
        swap(&mut lock(table), first.take().unwrap_or_default());
    }
    while let Some(entry) = reader.next().await {
        let entry = entry?;
        let Some(id) = entry.key.rsplit('.').next() else {
            continue;
        };
        let record = entry
            .value
            .and_then(|value| decode::<JobRecord>(&value).ok());
        let mut table = lock(table);
        let gone = table.deleted.contains(id);
        let Some(jobs) = first.as_mut().or(table.shown.as_mut()) else {
            continue;
        };
        match record {
            Some(record) if !gone => jobs.insert(id.to_string(), Arc::new(record)),
            _ => jobs.remove(id),
        };
        if first.is_some() && reader.caught_up {
            swap(&mut table, first.take().unwrap_or_default());
        }
    }
    Ok(())
}

/// Builds a snapshot every second and hands it to the page's connections.
async fn sample(source: Source, jobs: JobTable, tx: watch::Sender<Arc<String>>) {
    let mut history: VecDeque<(u64, f64)> = VecDeque::with_capacity(HISTORY);
    let mut last: Option<(u64, HashMap<String, u64>)> = None;
    let usage = Arc::new(std::sync::Mutex::new(UsageTotals::new()));
    tokio::spawn(tail_usage(source.clone(), usage.clone()));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // A slow pass (a large grid) delays the next one rather than queueing a burst.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u64.. {
        tick.tick().await;
        // Nobody watching live (the state keeps one receiver): a pass every few seconds only,
        // so that an idle dashboard costs the grid next to nothing.
        if tx.receiver_count() <= 1 && n % IDLE_EVERY != 0 {
            continue;
        }
        let usage = usage_json(&usage.lock().unwrap_or_else(|p| p.into_inner()));
        let pass = snapshot(&source, &jobs, &mut history, &mut last, &usage);
        match tokio::time::timeout(PASS_LIMIT, pass).await {
            Ok(Ok(v)) => {
                if tx.send(Arc::new(v.to_string())).is_err() {
                    return;
                }
            }
            Ok(Err(e)) => tracing::warn!("dashboard: {e:#}"),
            Err(_) => tracing::warn!("dashboard: reading the grid took too long"),
        }
    }
}

async fn snapshot(
    source: &Source,
    table: &JobTable,
    history: &mut VecDeque<(u64, f64)>,
    last: &mut Option<(u64, HashMap<String, u64>)>,
    usage: &Value,
) -> Result<Value> {
    let now = grid_client::now_unix_ms();
    // Newest first (job ids start with their submission time); what ended in each.
    let (jobs, jobs_total, ended) = match lock(table).shown.as_ref() {
        Some(all) => (
            all.values()
                .rev()
                .take(JOBS_SHOWN)
                .cloned()
                .collect::<Vec<_>>(),
            all.len(),
            Some(
                all.values()
                    .map(|j| {
                        let c = &j.counts;
                        (j.id.clone(), c.succeeded + c.failed + c.disputed)
                    })
                    .collect::<HashMap<_, _>>(),
            ),
        ),
        None => (Vec::new(), 0, None),
    };
    if let (Some((at, before)), Some(ended)) = (last.as_ref(), ended.as_ref()) {
        let seconds = now.saturating_sub(*at) as f64 / 1000.0;
        if seconds > 0.0 {
            // Per job, never negative: a retry takes its failures out of a job's count, and
            // a deleted job takes its tasks with it; neither is work undone.
            let done: u64 = ended
                .iter()
                .map(|(id, &n)| n.saturating_sub(before.get(id).copied().unwrap_or(0)))
                .sum();
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back((now, done as f64 / seconds));
        }
    }
    if let Some(ended) = ended {
        *last = Some((now, ended));
    }
    let mut nodes = Vec::new();
    for node in source.grid.live_nodes().await? {
        let tally = match source.grid.tally().await?.get(&node.id).await {
            Ok(Some(bytes)) => decode::<grid_proto::NodeTally>(&bytes).unwrap_or_default(),
            _ => grid_proto::NodeTally::default(),
        };
        nodes.push(json!({
            "id": node.id,
            "classes": node.classes,
            "gpu": node.gpu,
            "slots": node.slots,
            "running": node.running,
            "held": node.busy,
            "tasks_done": node.tasks_done,
            "votes_agreed": tally.agreed,
            "votes_lost": tally.outvoted,
            "preparing": node.preparing,
        }));
    }
    let shown: Vec<Value> = jobs
        .iter()
        .map(|record| {
            let mut v = crate::status::status_json(record);
            v["tenant"] = json!(record.spec.tenant);
            v["module"] = json!(record.spec.module_name);
            v["created_unix_ms"] = json!(record.created_unix_ms);
            v["finished_unix_ms"] = json!(record.finished_unix_ms);
            v
        })
        .collect();
    Ok(json!({
        "at_unix_ms": now,
        "scope": source.tenant.as_deref().map_or("all tenants".to_string(), |t| format!("tenant {t}")),
        "nodes": nodes,
        "jobs": shown,
        "jobs_total": jobs_total,
        "throughput": history.iter().map(|(at, rate)| json!([at, rate])).collect::<Vec<_>>(),
        "usage": usage,
    }))
}

/// Per tenant: attempts billed, CPU, wall and GPU seconds.
type UsageTotals = BTreeMap<String, (u64, f64, f64, f64)>;

/// Keeps `totals` up to date with the usage ledger: one read of what is there, then each new
/// entry as it is written (ledger entries are created once and never change). Re-reading the
/// whole ledger for every snapshot would cost the grid more the longer it ran: a 1M-task job
/// is a million entries.
async fn tail_usage(source: Source, totals: Arc<std::sync::Mutex<UsageTotals>>) {
    loop {
        if let Err(e) = tail_usage_once(&source, &totals).await {
            tracing::warn!("dashboard: following the usage ledger: {e:#}");
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

async fn tail_usage_once(source: &Source, totals: &std::sync::Mutex<UsageTotals>) -> Result<()> {
    let mut reader = source
        .grid
        .kv_follow(
            names::USAGE_BUCKET,
            source.tenant.as_deref(),
            async_nats::jetstream::consumer::DeliverPolicy::All,
        )
        .await?;
    lock(totals).clear();
    while let Some(entry) = reader.next().await {
        let Some(value) = entry?.value else {
            continue;
        };
        let Ok(e) = decode::<grid_proto::UsageEntry>(&value) else {
            continue; // another wire version
        };
        let mut totals = lock(totals);
        let t = totals.entry(e.tenant.clone()).or_default();
        t.0 += 1;
        t.1 += e.usage.cpu_seconds;
        t.2 += e.usage.wall_seconds;
        t.3 += e.usage.gpu_seconds;
    }
    Ok(())
}

fn usage_json(totals: &UsageTotals) -> Value {
    Value::Array(
        totals
            .iter()
            .map(|(tenant, (attempts, cpu, wall, gpu))| {
                json!({"tenant": tenant, "attempts": attempts, "cpu_seconds": cpu, "wall_seconds": wall, "gpu_seconds": gpu})
            })
            .collect(),
    )
}

/// What to tell the user of a dashboard served beyond this machine.
pub fn beyond_loopback_note(addr: std::net::SocketAddr) -> String {
    format!(
        "grid: the dashboard listens on {addr}, beyond this machine: from elsewhere, open it at \
         this machine's hostname or IP address with the same ?token= (another name needs \
         --allow-host NAME, or --dashboard-allow-host under `grid up`); the token and the page \
         travel unencrypted"
    )
}

/// Binds `listen` (a port of 0 takes a free one) and returns the listener and its address.
pub async fn bind(listen: &str) -> Result<(tokio::net::TcpListener, std::net::SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("--listen {listen}: cannot listen there"))?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

#[derive(clap::Args, Debug)]
pub struct DashboardArgs {
    /// Where to serve the page: HOST:PORT (port 0 takes a free one). It asks for its token
    /// wherever it listens.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8470")]
    pub listen: String,
    /// Also answer requests for NAME (how others reach this machine), at the dashboard's port
    /// unless NAME has one; repeatable. Always answered: the listen address; localhost beside
    /// loopback; this machine's hostname beyond loopback; any IP address on 0.0.0.0 or [::]
    #[arg(long = "allow-host", value_name = "NAME")]
    pub allow_host: Vec<String>,
    /// The token the dashboard asks for, instead of a random one (for scripts): at least 16 of
    /// A-Z a-z 0-9 - _ . ~
    #[arg(
        long,
        value_name = "TOKEN",
        env = "GRID_DASHBOARD_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    #[command(flatten)]
    pub conn: crate::conn::Conn,
}

/// `grid dashboard`: serves the page until Ctrl-C.
pub fn dashboard(args: DashboardArgs) -> Result<std::process::ExitCode> {
    let token = token(args.token.as_deref()).context("--token")?;
    crate::conn::runtime()?.block_on(async {
        let session = args.conn.open("dashboard").await?;
        let source = Source {
            tenant: session.scope(),
            grid: session.grid,
        };
        let (listener, addr) = bind(&args.listen).await?;
        let access = Access::new(addr, token, &args.allow_host);
        println!("grid: dashboard at {}", access.url(addr));
        use std::io::Write;
        let _ = std::io::stdout().flush();
        if !addr.ip().is_loopback() {
            eprintln!("{}", beyond_loopback_note(addr));
        }
        tokio::select! {
            served = serve(listener, source, access) => served?,
            () = grid_client::shutdown_signal() => {}
        }
        Ok(std::process::ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(listen: &str, allow: &[&str]) -> Access {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        Access::new(listen.parse().unwrap(), "t".repeat(64), &allow)
    }

    #[test]
    fn a_loopback_dashboard_answers_its_own_names_only() {
        let a = access("127.0.0.1:8470", &[]);
        for host in [
            "127.0.0.1:8470",
            "localhost:8470",
            "LOCALHOST:8470",
            "[::1]:8470",
        ] {
            assert!(a.host_allowed(host), "{host}");
        }
        for host in [
            "",
            "evil.example:8470",
            "localhost",
            "127.0.0.1:8471",
            "10.0.0.1:8470",
        ] {
            assert!(!a.host_allowed(host), "{host}");
        }
    }

    #[test]
    fn beyond_loopback_ip_addresses_the_hostname_and_given_names_are_answered() {
        let a = access(
            "0.0.0.0:8470",
            &["grid.example", "other.example:9000", "::2"],
        );
        for host in [
            "10.0.0.1:8470",
            "[fe80::1]:8470",
            "localhost:8470",
            "grid.example:8470",
            "Grid.Example:8470",
            "other.example:9000",
            "[::2]:8470",
        ] {
            assert!(a.host_allowed(host), "{host}");
        }
        if let Some(name) = hostname() {
            assert!(a.host_allowed(&format!("{name}:8470")));
        }
        for host in [
            "evil.example:8470",
            "10.0.0.1:8471",
            "grid.example",
            "grid.example:9000",
            "10.0.0.1.evil.example:8470",
        ] {
            assert!(!a.host_allowed(host), "{host}");
        }
        assert_eq!(
            a.url("0.0.0.0:8470".parse().unwrap()),
            format!("http://127.0.0.1:8470/?token={}", "t".repeat(64))
        );
    }

    #[test]
    fn the_token_is_found_checked_and_dropped_from_the_address() {
        let a = access("127.0.0.1:8470", &[]);
        assert!(a.grants(&"t".repeat(64)));
        assert!(!a.grants(&"t".repeat(63)) && !a.grants("") && !a.grants(&"u".repeat(64)));
        assert_eq!(token_in_query(Some("a=1&token=abc&b")), Some("abc"));
        assert_eq!(token_in_query(Some("tokens=abc")), None);
        assert_eq!(token_in_query(None), None);
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        assert_eq!(without_token(&uri("/?token=abc")), "/");
        assert_eq!(without_token(&uri("/x?a=1&token=abc&b=2")), "/x?a=1&b=2");
        assert_eq!(without_token(&uri("//evil.example/?token=abc")), "/");
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(
            header::COOKIE,
            "theme=dark; grid-dashboard-8470=secret".parse().unwrap(),
        );
        assert_eq!(a.cookie_in(&headers), Some("secret"));
        assert!(a.set_cookie().contains("HttpOnly; SameSite=Strict"));
    }

    #[test]
    fn a_chosen_token_must_be_long_and_url_safe_and_a_random_one_is_fresh() {
        assert!(token(Some("short")).is_err());
        assert!(token(Some("has space in it, sixteen+")).is_err());
        assert_eq!(
            token(Some("0123456789abcdef-_.~")).unwrap(),
            "0123456789abcdef-_.~"
        );
        let (a, b) = (token(None).unwrap(), token(None).unwrap());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
