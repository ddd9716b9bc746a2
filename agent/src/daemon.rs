//! The composition root: `sluice run`. Reading this function tells the whole
//! data flow: HTTP, MQTT and MQTT-over-TLS listeners → registry (auth: token or
//! client certificate; `[[devices]]` merged in at start; a reload closes
//! revoked sessions) → ThingsBoard JSON decoder →
//! outbox (group commit, ack after commit) → uplink (PUBACK → delete); the
//! admin socket reads everyone's figures.
//!
//! Shutdown (SIGTERM/SIGINT): listeners stop accepting and finish the requests
//! they hold (their commits complete), then the uplink waits up to
//! `cloud.shutdown_grace` for outstanding PUBACKs, then the outbox makes its
//! final commit. Any long-lived task that ends early is fatal: exit 1 and let
//! systemd restart us; the state is on disk.
//!
//! systemd: READY=1 once every listener is bound; WATCHDOG=1 only while the
//! outbox writer answers ([`crate::watchdog`]); SIGHUP re-reads the
//! configuration files ([`crate::reload`]) between RELOADING=1 and READY=1.

use crate::admin::{self, AdminContext};
use crate::attributes::AttributeStore;
use crate::config::Config;
use crate::downlink::Router;
use crate::http::{self, HttpContext};
use crate::metrics;
use crate::mqtt::{self, MqttContext, Sessions};
use crate::registry::Registry;
use crate::stats::IngestStats;
use anyhow::Context;
use sluice_cloud_sync::{Clock, Outbox, Uplink, UplinkConfig, UplinkStatus, statedb};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often the outbox expires old records, checkpoints its WAL and gives
/// free pages back.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(30);
/// How often the wall clock's trust is re-checked.
const CLOCK_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// How often the rules close aggregation windows and throttle intervals.
const RULES_TICK: Duration = Duration::from_millis(500);
/// How long listeners get to finish their requests at shutdown.
const LISTENER_DRAIN: Duration = Duration::from_secs(10);

/// How the daemon ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop, stopped cleanly.
    Stopped,
    /// A long-lived task ended early.
    TaskFailed(&'static str),
    /// The cloud's `gateway_reboot` (with `commands.allow_reboot`): stopped
    /// cleanly, to be started again by the supervisor.
    Reboot,
    /// A fleet configuration was installed or rolled back: run again with
    /// the configuration now on disk.
    Restart,
}

/// Runs the daemon until SIGTERM/SIGINT or a fatal task failure.
///
/// Fails at start-up when the state dir, a database, a listener or the TLS
/// files cannot be set up.
pub async fn run(cfg: Config) -> anyhow::Result<Exit> {
    let started = Instant::now();
    // Caught from here on, before the admin socket answers: a SIGTERM sent
    // as soon as the daemon looks up (systemd, a script) stops it cleanly
    // instead of killing it.
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    // SIGHUP (ExecReload=) re-reads the configuration files (reload.rs);
    // watched from here on too, so an early one waits instead of killing.
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGHUP; reload by restarting the service");
            None
        }
    };
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("gateway.state_dir {}", cfg.state_dir.display()))?;
    std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o750))
        .with_context(|| format!("gateway.state_dir {}", cfg.state_dir.display()))?;
    // The admin socket doubles as the single-instance guard: bind it before
    // touching any database.
    let admin_listener = admin::bind(&cfg.admin_socket)?;
    let epoch = statedb::epoch(&statedb::open(&cfg.state_db_path())?)
        .context("reading the gateway epoch")?;
    provision_devices(&cfg).await?;
    let registry = Arc::new(Registry::load(&cfg.state_db_path())?);
    let clock = Arc::new(Clock::new(cfg.clock));
    if !clock.trusted() {
        tracing::warn!(
            "the wall clock is not trusted yet: readings without ts are sent flagged ts_trusted=false until it is"
        );
    }
    let outbox = Outbox::open(
        &cfg.outbox_path(),
        &cfg.state_db_path(),
        cfg.outbox.clone(),
        clock.clone(),
    )?;
    let stats = Arc::new(IngestStats::default());
    let pipeline = Arc::new(crate::pipeline::Pipeline::new(
        outbox.clone(),
        &cfg.outbox_path(),
        registry.clone(),
        cfg.rules.clone(),
    )?);
    let attributes = Arc::new(AttributeStore::load(
        &cfg.state_db_path(),
        &cfg.firmware_dir(),
    )?);
    // Downlink plumbing: the uplink hands cloud requests to the router, the
    // router hands command responses back to the uplink.
    let (requests_tx, requests_rx) = mpsc::channel(256);
    let (responses_tx, responses_rx) =
        mpsc::channel::<sluice_cloud_sync::downlink::UpMessage>(1024);
    let uplink_status = cfg
        .cloud
        .as_ref()
        .map(|_| Arc::new(UplinkStatus::default()));

    let listeners_cancel = CancellationToken::new();
    let uplink_cancel = CancellationToken::new();
    let (ended_tx, mut ended_rx) = mpsc::channel::<&'static str>(32);
    // Cancelled when any long-lived task ends: the watchdog stops pinging.
    let task_ended = CancellationToken::new();
    let spawn = |name: &'static str, fut: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>| {
        let ended_tx = ended_tx.clone();
        let task_ended = task_ended.clone();
        tokio::spawn(async move {
            fut.await;
            task_ended.cancel();
            // Never wait here: once shutdown began nobody reads the channel,
            // and a task blocked on a full channel would never finish (its
            // JoinHandle is awaited below). The first early end is what
            // matters, and it always fits.
            let _ = ended_tx.try_send(name);
        })
    };

    let mut listeners = BTreeMap::new();
    let mut listener_tasks: Vec<JoinHandle<()>> = Vec::new();
    let mut http_tcp = None;
    if let Some(h) = &cfg.http {
        let tcp = tokio::net::TcpListener::bind(h.bind)
            .await
            .with_context(|| format!("listeners.http.bind {}", h.bind))?;
        let addr = tcp.local_addr().context("listeners.http.bind")?;
        listeners.insert("http", addr.to_string());
        http_tcp = Some((tcp, h.max_body));
    }

    let mqtt_sessions = Arc::new(Sessions::default());
    let coap_observers = Arc::new(crate::coap::Observers::default());
    let coaps_observers = Arc::new(crate::coap::Observers::default());
    let http_polls = Arc::new(http::LongPolls::default());
    let channels: Vec<Arc<dyn crate::downlink::DeviceChannel>> = vec![
        mqtt_sessions.clone(),
        coap_observers.clone(),
        coaps_observers.clone(),
        http_polls.clone(),
    ];
    let router = Arc::new(Router::new(
        registry.clone(),
        attributes.clone(),
        channels,
        uplink_status.clone().map(|u| (responses_tx, u)),
        cfg.cloud
            .as_ref()
            .map_or(Duration::from_secs(30), |c| c.command_timeout),
    ));
    if let Some((tcp, max_body)) = http_tcp {
        let router = http::router(Arc::new(HttpContext {
            registry: registry.clone(),
            outbox: outbox.clone(),
            pipeline: pipeline.clone(),
            stats: stats.clone(),
            clock: clock.clone(),
            max_body,
            router: router.clone(),
            long_polls: http_polls,
            shutdown: listeners_cancel.clone(),
        }));
        listener_tasks.push(spawn(
            "http listener",
            Box::pin(serve_http(tcp, router, listeners_cancel.clone())),
        ));
    }
    // Commands the cloud addresses to the gateway itself go to the health
    // task (spawned once the admin figures exist).
    let (gateway_commands_tx, gateway_commands_rx) = mpsc::channel(16);
    router.set_gateway(cfg.gateway_id.clone(), gateway_commands_tx);
    let throttle = Arc::new(
        cfg.mqtt
            .as_ref()
            .or(cfg.mqtts.as_ref().map(|m| &m.listener))
            .map_or(
                crate::throttle::AuthThrottle::new(0, Duration::from_secs(60)),
                |m| crate::throttle::AuthThrottle::new(m.auth_fail_limit, m.auth_fail_window),
            ),
    );
    // mqtt and mqtts share the session table, so a device's second
    // connection takes over its first whichever listener each came through.
    let mqtt_context = |m: &crate::config::MqttListenerConfig| {
        Arc::new(MqttContext {
            registry: registry.clone(),
            outbox: outbox.clone(),
            stats: stats.clone(),
            clock: clock.clone(),
            sessions: mqtt_sessions.clone(),
            max_packet_size: m.max_packet_size,
            max_connections: m.max_connections,
            connect_timeout: m.connect_timeout,
            router: router.clone(),
            throttle: throttle.clone(),
            mappings: Arc::new(cfg.mqtt_mappings.clone()),
            pipeline: pipeline.clone(),
        })
    };
    if let Some(m) = &cfg.mqtt {
        let tcp = tokio::net::TcpListener::bind(m.bind)
            .await
            .with_context(|| format!("listeners.mqtt.bind {}", m.bind))?;
        let addr = tcp.local_addr().context("listeners.mqtt.bind")?;
        listeners.insert("mqtt", addr.to_string());
        let ctx = mqtt_context(m);
        listener_tasks.push(spawn(
            "mqtt listener",
            Box::pin(mqtt::serve(tcp, ctx, None, listeners_cancel.clone())),
        ));
    }
    if let Some(m) = &cfg.mqtts {
        let tls = crate::tls::server_config("listeners.mqtts", &m.tls)?;
        let tcp = tokio::net::TcpListener::bind(m.listener.bind)
            .await
            .with_context(|| format!("listeners.mqtts.bind {}", m.listener.bind))?;
        let addr = tcp.local_addr().context("listeners.mqtts.bind")?;
        listeners.insert("mqtts", addr.to_string());
        let ctx = mqtt_context(&m.listener);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        listener_tasks.push(spawn(
            "mqtts listener",
            Box::pin(mqtt::serve(
                tcp,
                ctx,
                Some(acceptor),
                listeners_cancel.clone(),
            )),
        ));
    }

    let coap_counters = Arc::new(crate::coap::CoapStats::default());
    if let Some(c) = &cfg.coap {
        let sock = tokio::net::UdpSocket::bind(c.bind)
            .await
            .with_context(|| format!("listeners.coap.bind {}", c.bind))?;
        let (sock, recv_buffer) = crate::coap::enlarge_receive_buffer(sock)
            .with_context(|| format!("listeners.coap.bind {}", c.bind))?;
        tracing::debug!(bytes = recv_buffer, "CoAP socket receive buffer");
        let addr = sock.local_addr().context("listeners.coap.bind")?;
        listeners.insert("coap", addr.to_string());
        let ctx = Arc::new(crate::coap::CoapContext {
            registry: registry.clone(),
            outbox: outbox.clone(),
            pipeline: pipeline.clone(),
            stats: stats.clone(),
            clock: clock.clone(),
            router: router.clone(),
            observers: coap_observers.clone(),
            throttle: Arc::new(crate::throttle::AuthThrottle::new(
                c.auth_fail_limit,
                c.auth_fail_window,
            )),
            config: c.clone(),
            counters: coap_counters.clone(),
        });
        listener_tasks.push(spawn(
            "coap listener",
            Box::pin(crate::coap::serve(sock, ctx, listeners_cancel.clone())),
        ));
    }

    let mut coaps_side = None;
    if let Some(c) = &cfg.coaps {
        let sock = tokio::net::UdpSocket::bind(c.coap.bind)
            .await
            .with_context(|| format!("listeners.coaps.bind {}", c.coap.bind))?;
        let (sock, _) = crate::coap::enlarge_receive_buffer(sock)
            .with_context(|| format!("listeners.coaps.bind {}", c.coap.bind))?;
        let addr = sock.local_addr().context("listeners.coaps.bind")?;
        listeners.insert("coaps", addr.to_string());
        let throttle = Arc::new(crate::throttle::AuthThrottle::new(
            c.coap.auth_fail_limit,
            c.coap.auth_fail_window,
        ));
        let side = Arc::new(
            crate::coaps::DtlsSide::new(
                registry.clone(),
                c.limits.clone(),
                c.mtu,
                throttle.clone(),
            )
            .context("listeners.coaps")?,
        );
        let ctx = Arc::new(crate::coap::CoapContext {
            registry: registry.clone(),
            outbox: outbox.clone(),
            pipeline: pipeline.clone(),
            stats: stats.clone(),
            clock: clock.clone(),
            router: router.clone(),
            observers: coaps_observers.clone(),
            throttle,
            config: c.coap.clone(),
            counters: coap_counters.clone(),
        });
        listener_tasks.push(spawn(
            "coaps listener",
            Box::pin(crate::coap::serve_dtls(
                sock,
                ctx,
                side.clone(),
                listeners_cancel.clone(),
            )),
        ));
        coaps_side = Some(side);
    }

    let mut uplink_task = None;
    match (&cfg.cloud, &uplink_status) {
        (None, _) | (_, None) => {
            tracing::info!("no [cloud] configured: offline mode, records stay in the outbox");
        }
        (Some(c), Some(status)) => {
            let password = match &c.password_file {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .with_context(|| format!("cloud.password_file {}", p.display()))?
                        .trim_end_matches(['\n', '\r'])
                        .to_owned(),
                ),
                None => None,
            };
            let uplink = Uplink::new(
                UplinkConfig {
                    host: c.host.clone(),
                    port: c.port,
                    tls: c.tls.clone(),
                    client_id: c.client_id.clone(),
                    credentials: c
                        .username
                        .clone()
                        .map(|u| (u, password.unwrap_or_default())),
                    topic_prefix: c.topic_prefix.clone(),
                    keep_alive: c.keep_alive,
                    batch_max_records: c.batch_max_records,
                    batch_max_bytes: c.batch_max_bytes,
                    max_inflight: c.max_inflight,
                    max_bytes_per_sec: c.max_bytes_per_sec,
                    drain: c.drain,
                    backoff_min: c.backoff.0,
                    backoff_max: c.backoff.1,
                    shutdown_grace: c.shutdown_grace,
                    gateway_id: cfg.gateway_id.clone(),
                    epoch: epoch.clone(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    profile: c.profile,
                    mqtt_version: c.mqtt_version,
                    device_type: {
                        let registry = registry.clone();
                        sluice_cloud_sync::uplink::DeviceTypes(Arc::new(move |d: &str| {
                            registry
                                .device_type(&sluice_cloud_sync::DeviceName::new(d))
                                .unwrap_or_else(|| "default".to_owned())
                        }))
                    },
                },
                outbox.clone(),
                status.clone(),
            )?
            .with_downlink(requests_tx, responses_rx);
            let cancel = uplink_cancel.clone();
            uplink_task = Some(spawn("uplink", Box::pin(uplink.run(cancel))));
        }
    }
    let router_task = spawn(
        "downlink router",
        Box::pin(router.clone().run(requests_rx, uplink_cancel.clone())),
    );

    let metrics_tcp = match cfg.metrics_bind {
        None => None,
        Some(bind) => {
            let tcp = tokio::net::TcpListener::bind(bind)
                .await
                .with_context(|| format!("metrics.bind {bind}"))?;
            let addr = tcp.local_addr().context("metrics.bind")?;
            listeners.insert("metrics", addr.to_string());
            Some(tcp)
        }
    };
    let admin_ctx_uplink = uplink_status.clone();
    let admin_ctx = Arc::new(AdminContext {
        started,
        gateway_id: cfg.gateway_id.clone(),
        epoch: epoch.clone(),
        listeners: listeners.clone(),
        outbox: outbox.clone(),
        uplink: uplink_status,
        router: router.clone(),
        pipeline: pipeline.clone(),
        coap: coap_counters,
        coap_observers,
        coaps: coaps_side,
        registry: registry.clone(),
        stats: stats.clone(),
        mqtt_sessions,
    });
    if let Some(tcp) = metrics_tcp {
        let router = metrics::router(admin_ctx.clone());
        listener_tasks.push(spawn(
            "metrics listener",
            Box::pin(serve_http(tcp, router, listeners_cancel.clone())),
        ));
    }
    let reboot = CancellationToken::new();
    let health_task = spawn(
        "health",
        Box::pin(
            crate::health::Health {
                ctx: admin_ctx.clone(),
                state_dir: cfg.state_dir.clone(),
                interval: cfg.health_interval,
                allow_reboot: cfg.allow_reboot,
            }
            .run(
                gateway_commands_rx,
                reboot.clone(),
                listeners_cancel.clone(),
            ),
        ),
    );
    let admin_task = spawn(
        "admin socket",
        Box::pin(admin::serve(
            admin_listener,
            admin_ctx,
            listeners_cancel.clone(),
        )),
    );

    // Always running: a fleet configuration may add rules without a restart.
    let rules_task = Some({
        let pipeline = pipeline.clone();
        let cancel = listeners_cancel.clone();
        let clock = clock.clone();
        spawn(
            "rules clock",
            Box::pin(async move {
                let mut tick = tokio::time::interval(RULES_TICK);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        _ = tick.tick() => {
                            if let Err(e) = pipeline.tick(clock.now().wall_ms).await {
                                tracing::warn!(error = %e, "closing rule windows failed; retrying next tick");
                            }
                        }
                    }
                }
            }),
        )
    });
    let restart = CancellationToken::new();
    let fleet_task = cfg.fleet.clone().map(|fc| {
        let (tx, rx) = mpsc::channel(8);
        router.set_fleet(tx);
        let task = crate::fleet::FleetTask {
            state_dir: cfg.state_dir.clone(),
            source: cfg.source.clone(),
            config: fc,
            uplink: admin_ctx_uplink.clone(),
            router: router.clone(),
            restart: restart.clone(),
            pipeline: pipeline.clone(),
        };
        tokio::spawn(task.run(rx, listeners_cancel.clone()))
    });
    // A gateway update handed to the installer before the restart that
    // brought us here: committed once the uplink is up within
    // firmware.confirm_timeout, else rolled back (selfupdate.rs).
    tokio::spawn({
        let (cfg, router, uplink) = (cfg.clone(), router.clone(), admin_ctx_uplink.clone());
        let cancel = listeners_cancel.clone();
        async move {
            let connected = move || uplink.as_ref().is_some_and(|u| u.connected());
            let report = move |doc: serde_json::Value| {
                tracing::info!(report = %doc, "gateway update outcome");
                router.up(sluice_cloud_sync::downlink::UpMessage::FirmwareState(
                    doc.to_string().into_bytes(),
                ));
            };
            tokio::select! {
                () = crate::selfupdate::confirm(cfg, connected, report) => {}
                () = cancel.cancelled() => {}
            }
        }
    });
    // Firmware manifests, downloads and campaigns.
    let ota_task = {
        let (ota, ota_rx) = crate::ota::OtaHandle::new(&cfg);
        router.set_firmware(ota.clone());
        pipeline.set_firmware(ota.clone());
        let task = crate::ota::run(
            cfg.clone(),
            ota,
            ota_rx,
            router.clone(),
            registry.clone(),
            listeners_cancel.clone(),
        );
        // state.db work blocks: the task gets a thread of its own.
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || rt.block_on(task))
    };
    let upkeep_outbox = outbox.clone();
    let upkeep_cancel = listeners_cancel.clone();
    let upkeep_clock = clock.clone();
    let upkeep_task = spawn(
        "outbox upkeep",
        Box::pin(async move {
            let mut maintain = tokio::time::interval(MAINTENANCE_INTERVAL);
            let mut clock_check = tokio::time::interval(CLOCK_CHECK_INTERVAL);
            loop {
                let alive = tokio::select! {
                    () = upkeep_cancel.cancelled() => break,
                    _ = maintain.tick() => upkeep_outbox.maintain().await.is_ok(),
                    _ = clock_check.tick() => {
                        if upkeep_clock.refresh() {
                            tracing::info!("the wall clock is trusted now: re-stamping queued readings");
                            upkeep_outbox.restamp().await.is_ok()
                        } else {
                            true
                        }
                    }
                };
                if !alive {
                    break;
                }
            }
        }),
    );

    // WatchdogSec=: pinged only while the outbox writer answers and no
    // long-lived task has ended (watchdog.rs).
    if let Some(period) = sd_notify::watchdog_enabled() {
        let probe = {
            let (outbox, task_ended) = (outbox.clone(), task_ended.clone());
            move || {
                let (outbox, task_ended) = (outbox.clone(), task_ended.clone());
                async move {
                    if task_ended.is_cancelled() {
                        return Err("a long-lived task ended".to_owned());
                    }
                    outbox.ping().await.map_err(|e| e.to_string())
                }
            }
        };
        let ping = || {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        };
        tokio::spawn(crate::watchdog::run(
            period,
            probe,
            ping,
            uplink_cancel.clone(),
        ));
    }
    let mut running = cfg.raw.clone();
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!(
        gateway = %cfg.gateway_id,
        epoch = %epoch,
        listeners = ?listeners,
        admin = %cfg.admin_socket.display(),
        ready_ms = started.elapsed().as_millis() as u64,
        "sluice ready"
    );

    let exit = loop {
        tokio::select! {
            () = &mut shutdown => break Exit::Stopped,
            () = reboot.cancelled() => break Exit::Reboot,
            () = restart.cancelled() => break Exit::Restart,
            name = ended_rx.recv() => {
                let name = name.unwrap_or("unknown task");
                tracing::error!(task = name, "a long-lived task ended early; exiting");
                break Exit::TaskFailed(name);
            }
            () = hangup(&mut hangups) => {
                notify_reloading();
                if reload(&cfg, &mut running, &pipeline).await {
                    break Exit::Restart;
                }
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    };
    if exit == Exit::Restart {
        // Not STOPPING=1: systemd would take that for the service going
        // down and kill it after TimeoutStopSec=. The next run's READY=1
        // ends the reload.
        notify_reloading();
    } else {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    }
    tracing::info!("shutting down: stopping listeners");
    listeners_cancel.cancel();
    for t in listener_tasks {
        if tokio::time::timeout(LISTENER_DRAIN, t).await.is_err() {
            tracing::warn!("a listener did not finish its requests in time");
        }
    }
    let _ = admin_task.await;
    let _ = upkeep_task.await;
    let _ = health_task.await;
    if let Some(t) = fleet_task {
        let _ = t.await;
    }
    let _ = ota_task.await;
    if let Some(t) = rules_task {
        let _ = t.await;
    }
    uplink_cancel.cancel();
    if let Some(t) = uplink_task {
        let _ = t.await;
    }
    let _ = router_task.await;
    outbox.close().await;
    let store = attributes.clone();
    let _ = tokio::task::spawn_blocking(move || store.close()).await;
    let _ = std::fs::remove_file(&cfg.admin_socket);
    tracing::info!("stopped");
    Ok(exit)
}

/// Merges the configuration's `[[devices]]` into the registry before it is
/// loaded; a fleet configuration is applied by running this again, so
/// this is also where its devices arrive and its removed ones are revoked.
///
/// Fails when state.db cannot be read or written.
async fn provision_devices(cfg: &Config) -> anyhow::Result<()> {
    let state_db = cfg.state_db_path();
    let devices = cfg.devices.clone();
    let report = tokio::task::spawn_blocking(move || {
        crate::registry::RegistryDb::open(&state_db)?.provision(&devices)
    })
    .await
    .context("provisioning [[devices]]")?
    .context("provisioning [[devices]]")?;
    if !(report.added.is_empty() && report.updated.is_empty() && report.revoked.is_empty()) {
        tracing::info!(
            added = ?report.added,
            updated = ?report.updated,
            revoked = ?report.revoked,
            "devices provisioned by configuration"
        );
    }
    for (device, reason) in &report.skipped {
        tracing::warn!(%device, reason = %reason, "a [[devices]] entry was not applied");
    }
    Ok(())
}

/// Serves `router` on `tcp` until `cancel`, then lets in-flight requests
/// finish (their commits complete).
async fn serve_http(tcp: tokio::net::TcpListener, router: axum::Router, cancel: CancellationToken) {
    let addr = tcp.local_addr().map(|a| a.to_string()).unwrap_or_default();
    if let Err(e) = axum::serve(tcp, router)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        tracing::error!(%addr, error = %e, "HTTP server failed");
    }
}

/// Applies the configuration files on SIGHUP (see reload.rs); true when
/// the daemon must restart in process to apply them. `running` is the raw
/// configuration in force, updated when rules are swapped in place.
async fn reload(
    cfg: &Config,
    running: &mut crate::config::RawConfig,
    pipeline: &crate::pipeline::Pipeline,
) -> bool {
    use crate::reload::Reload;
    tracing::info!(config = %cfg.source.display(), "SIGHUP: re-reading the configuration");
    let (current, source) = (running.clone(), cfg.source.clone());
    let plan = match tokio::task::spawn_blocking(move || crate::reload::plan(&current, &source))
        .await
    {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "reloading the configuration failed; keeping the running one");
            return false;
        }
    };
    match plan {
        Reload::Unchanged => {
            tracing::info!("configuration unchanged");
            false
        }
        Reload::Rules(new) => {
            let count = new.rules.len();
            pipeline.set_rules(new.rules.clone()).await;
            *running = new.raw;
            tracing::info!(
                rules = count,
                "configuration reloaded: rules applied in place"
            );
            false
        }
        Reload::Restart => {
            tracing::info!("configuration changed: restarting in process to apply it");
            true
        }
        Reload::Invalid(e) => {
            tracing::error!(error = %e, "the configuration on disk is invalid; keeping the running one");
            false
        }
    }
}

/// The next SIGHUP; never, when SIGHUP cannot be watched.
async fn hangup(hangups: &mut Option<tokio::signal::unix::Signal>) {
    match hangups {
        Some(s) => {
            if s.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Tells systemd a reload began (RELOADING=1 with the MONOTONIC_USEC that
/// systemd 253 and later require with it); READY=1 ends it.
fn notify_reloading() {
    let mut states = vec![sd_notify::NotifyState::Reloading];
    if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    let _ = sd_notify::notify(&states);
}

/// SIGTERM or SIGINT. Both are watched from the call on, not from the
/// first poll: one that arrives in between is not lost, and does not kill
/// the process with the default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Err(e), Ok(mut int)) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the daemon");
                int.recv().await;
            }
            (Ok(mut term), Err(e)) => {
                tracing::warn!(error = %e, "cannot watch SIGINT; only SIGTERM stops the daemon");
                term.recv().await;
            }
            (Err(e), Err(_)) => {
                tracing::error!(error = %e, "cannot watch SIGTERM or SIGINT");
                std::future::pending::<()>().await;
            }
        }
    }
}
