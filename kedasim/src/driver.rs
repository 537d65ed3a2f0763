//! The controller loop: poll the scaler, decide, create jobs, reap them, report events.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::proto::external_scaler_client::ExternalScalerClient;
use crate::proto::{GetMetricsRequest, ScaledObjectRef};
use crate::strategy::{decide, ReplicaBounds, TriggerReading};

/// How to reach the external scaler (KEDA's `scalerAddress`, `enableTLS`, `caCert`,
/// `tlsClientCert`, `tlsClientKey`).
#[derive(Clone, Debug, Default)]
pub struct ScalerConnection {
    /// `host:port` or a URL; `https://` (or a CA) turns TLS on.
    pub address: String,
    pub ca_cert_pem: Option<String>,
    pub client_identity_pem: Option<(String, String)>,
    /// Name to verify the server certificate against, when not the address's host.
    pub tls_server_name: Option<String>,
}

/// The Job template: one local process per Job.
#[derive(Clone, Debug)]
pub struct JobTemplate {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Set on top of this process's environment.
    pub env: Vec<(String, String)>,
    /// Write each job's output to `<dir>/<job name>.log` instead of this process's stderr.
    pub log_dir: Option<PathBuf>,
}

/// A ScaledJob as KEDA sees it.
#[derive(Clone, Debug)]
pub struct ScaledJob {
    pub name: String,
    pub namespace: String,
    pub trigger_metadata: HashMap<String, String>,
    pub polling_interval: Duration,
    pub bounds: ReplicaBounds,
    pub job: JobTemplate,
}

/// When the loop ends.
#[derive(Clone, Copy, Debug, Default)]
pub struct StopWhen {
    /// Once the trigger reports inactive and no job is running.
    pub inactive_and_idle: bool,
    /// Give up after this long (failed run).
    pub timeout: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("invalid scaler address {address:?}: {source}")]
    Address {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("cannot start job {job}: {source}")]
    Spawn { job: String, source: std::io::Error },
    #[error("cannot create the job log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One event, as `kubectl describe scaledjob` lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: &'static str,
    pub reason: &'static str,
    pub message: String,
    pub at: Duration,
}

/// What happened during a run.
#[derive(Clone, Debug, Default)]
pub struct RunReport {
    pub events: Vec<Event>,
    pub jobs_created: u64,
    pub jobs_succeeded: u64,
    pub jobs_failed: u64,
    pub polls: u64,
    pub scaler_errors: u64,
    pub timed_out: bool,
    pub interrupted: bool,
}

impl RunReport {
    /// A successful run: not timed out and every job succeeded.
    pub fn success(&self) -> bool {
        !self.timed_out && !self.interrupted && self.jobs_failed == 0
    }

    /// The `Events:` block of `kubectl describe scaledjob`, ages relative to `now`.
    pub fn describe(&self, name: &str, namespace: &str, now: Duration) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "Name:         {name}");
        let _ = writeln!(out, "Namespace:    {namespace}");
        let _ = writeln!(
            out,
            "Status:       jobs created {}, succeeded {}, failed {}",
            self.jobs_created, self.jobs_succeeded, self.jobs_failed
        );
        let _ = writeln!(out, "Events:");
        let _ = writeln!(
            out,
            "{}",
            event_row("Type", "Reason", "Age", "From", "Message")
        );
        let _ = writeln!(
            out,
            "{}",
            event_row("----", "------", "----", "----", "-------")
        );
        for event in &self.events {
            let age = format_age(now.saturating_sub(event.at));
            let _ = writeln!(
                out,
                "{}",
                event_row(
                    event.kind,
                    event.reason,
                    &age,
                    "keda-operator",
                    &event.message
                )
            );
        }
        out
    }
}

fn event_row(kind: &str, reason: &str, age: &str, from: &str, message: &str) -> String {
    format!("  {kind:<8}{reason:<20}{age:<6}{from:<15}{message}")
}

fn format_age(age: Duration) -> String {
    let secs = age.as_secs();
    if secs < 120 {
        format!("{secs}s")
    } else {
        format!("{}m", secs / 60)
    }
}

/// Connect to the scaler like KEDA's `getClientForConnectionPool` (lazily: a scaler that is
/// not up yet shows as a failed poll, not a crash).
pub fn connect(
    connection: &ScalerConnection,
) -> Result<ExternalScalerClient<Channel>, DriverError> {
    let address_error = |source| DriverError::Address {
        address: connection.address.clone(),
        source,
    };
    let tls_wanted = connection.address.starts_with("https://") || connection.ca_cert_pem.is_some();
    let url = if connection.address.contains("://") {
        connection.address.clone()
    } else if tls_wanted {
        format!("https://{}", connection.address)
    } else {
        format!("http://{}", connection.address)
    };
    let mut endpoint = Endpoint::from_shared(url)
        .map_err(address_error)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    if tls_wanted {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &connection.ca_cert_pem {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &connection.client_identity_pem {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &connection.tls_server_name {
            tls = tls.domain_name(name.clone());
        }
        endpoint = endpoint.tls_config(tls).map_err(address_error)?;
    }
    Ok(ExternalScalerClient::new(endpoint.connect_lazy()))
}

/// How long interrupted jobs get to stop after SIGTERM (a pod's default grace period).
pub const JOB_TERMINATION_GRACE: Duration = Duration::from_secs(30);

/// A Job: a child process and its name.
struct RunningJob {
    name: String,
    child: Child,
}

/// The controller.
pub struct Driver {
    client: ExternalScalerClient<Channel>,
    scaled_job: ScaledJob,
    started: Instant,
    jobs: Vec<RunningJob>,
    report: RunReport,
    was_active: Option<bool>,
    next_job_id: u64,
}

impl Driver {
    pub fn new(client: ExternalScalerClient<Channel>, scaled_job: ScaledJob) -> Self {
        Driver {
            client,
            scaled_job,
            started: Instant::now(),
            jobs: Vec::new(),
            report: RunReport::default(),
            was_active: None,
            next_job_id: 0,
        }
    }

    /// Run polling intervals until `stop` says so. Events are printed as they happen.
    /// `interrupt` resolving stops the loop: running jobs get SIGTERM (as a pod deletion
    /// would), then SIGKILL after [`JOB_TERMINATION_GRACE`].
    pub async fn run(
        mut self,
        stop: StopWhen,
        interrupt: impl std::future::Future<Output = ()>,
    ) -> Result<RunReport, DriverError> {
        let deadline = stop.timeout.map(|timeout| self.started + timeout);
        let mut ticker = tokio::time::interval(self.scaled_job.polling_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut interrupt = std::pin::pin!(interrupt);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = &mut interrupt => {
                    self.report.interrupted = true;
                    self.terminate_jobs().await;
                    return Ok(self.report);
                }
            }
            self.reap_jobs();
            let reading = self.poll().await;
            let decision = decide(reading, self.scaled_job.bounds, self.jobs.len() as i64);
            eprintln!(
                "kedasim: poll {}: queueLength={} target={} isActive={} running={} maxScale={} -> create {}",
                self.report.polls,
                reading.map_or("error".to_owned(), |r| r.queue_length.to_string()),
                reading.map_or("-".to_owned(), |r| r.target.to_string()),
                decision.is_active,
                self.jobs.len(),
                decision.max_scale,
                decision.jobs_to_create,
            );
            self.note_activity(decision.is_active);
            if decision.jobs_to_create > 0 {
                self.create_jobs(decision.jobs_to_create)?;
            }
            if stop.inactive_and_idle
                && reading.is_some()
                && !decision.is_active
                && self.jobs.is_empty()
            {
                break;
            }
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                self.report.timed_out = true;
                self.event(
                    "Warning",
                    "KEDASimTimeout",
                    "Gave up waiting for the queue to drain".to_owned(),
                );
                break;
            }
        }
        self.wait_for_jobs(deadline).await;
        Ok(self.report)
    }

    /// Elapsed time since the start, for event ages.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// One polling round: GetMetricSpec, GetMetrics, IsActive (KEDA's order).
    async fn poll(&mut self) -> Option<TriggerReading> {
        self.report.polls += 1;
        match self.try_poll().await {
            Ok(reading) => Some(reading),
            Err(status) => {
                self.report.scaler_errors += 1;
                self.event(
                    "Warning",
                    "KEDAScalerFailed",
                    format!("{:?}: {}", status.code(), error_chain(&status)),
                );
                None
            }
        }
    }

    async fn try_poll(&mut self) -> Result<TriggerReading, tonic::Status> {
        let scaled_object = ScaledObjectRef {
            name: self.scaled_job.name.clone(),
            namespace: self.scaled_job.namespace.clone(),
            scaler_metadata: self.scaled_job.trigger_metadata.clone(),
        };
        let spec = self
            .client
            .get_metric_spec(scaled_object.clone())
            .await?
            .into_inner();
        let Some(first) = spec.metric_specs.first() else {
            return Err(tonic::Status::internal("GetMetricSpec returned no metric"));
        };
        let target = if first.target_size_float > 0.0 {
            first.target_size_float
        } else {
            first.target_size as f64
        };
        let metrics = self
            .client
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(scaled_object.clone()),
                metric_name: first.metric_name.clone(),
            })
            .await?
            .into_inner();
        // KEDA keys every returned value by the requested metric name and sums them.
        let queue_length = metrics
            .metric_values
            .iter()
            .map(|value| {
                if value.metric_value_float > 0.0 {
                    value.metric_value_float
                } else {
                    value.metric_value as f64
                }
            })
            .sum();
        let is_active = self
            .client
            .is_active(scaled_object)
            .await?
            .into_inner()
            .result;
        Ok(TriggerReading {
            queue_length,
            target,
            is_active,
        })
    }

    fn note_activity(&mut self, is_active: bool) {
        if self.was_active == Some(is_active) {
            return;
        }
        let was_active = self.was_active.unwrap_or(false);
        self.was_active = Some(is_active);
        if is_active && !was_active {
            self.event(
                "Normal",
                "ScaledJobActive",
                "Scaling is performed because triggers are active".to_owned(),
            );
        } else if !is_active && was_active {
            self.event(
                "Normal",
                "ScaledJobInactive",
                "Scaling is not performed because triggers are not active".to_owned(),
            );
        }
    }

    fn create_jobs(&mut self, count: i64) -> Result<(), DriverError> {
        for _ in 0..count {
            let job = self.spawn_job()?;
            self.jobs.push(job);
            self.report.jobs_created += 1;
        }
        self.event("Normal", "KEDAJobsCreated", format!("Created {count} jobs"));
        Ok(())
    }

    fn spawn_job(&mut self) -> Result<RunningJob, DriverError> {
        self.next_job_id += 1;
        // Like `generateName: <scaledjob>-`: unique and ordered for readable logs.
        let name = format!("{}-{:05}", self.scaled_job.name, self.next_job_id);
        let template = &self.scaled_job.job;
        let mut command = Command::new(&template.program);
        command
            .args(&template.args)
            .envs(template.env.iter().map(|(k, v)| (k, v)))
            .env("KEDASIM_JOB_NAME", &name)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        match &template.log_dir {
            Some(dir) => {
                let path = dir.join(format!("{name}.log"));
                let log = std::fs::File::create(&path).map_err(|source| DriverError::Log {
                    path: path.clone(),
                    source,
                })?;
                let log_err = log
                    .try_clone()
                    .map_err(|source| DriverError::Log { path, source })?;
                command.stdout(log).stderr(log_err);
            }
            None => {
                // Keep our stdout for events: job output goes to our stderr.
                command.stdout(stderr_stdio()).stderr(Stdio::inherit());
            }
        }
        let child = command.spawn().map_err(|source| DriverError::Spawn {
            job: name.clone(),
            source,
        })?;
        Ok(RunningJob { name, child })
    }

    /// Drop finished jobs from the running set (KEDA counts only unfinished Jobs).
    fn reap_jobs(&mut self) {
        let mut still_running = Vec::with_capacity(self.jobs.len());
        for mut job in std::mem::take(&mut self.jobs) {
            match job.child.try_wait() {
                Ok(Some(status)) => self.job_finished(&job.name, status),
                Ok(None) => still_running.push(job),
                Err(err) => {
                    eprintln!("kedasim: cannot check job {}: {err}", job.name);
                    self.report.jobs_failed += 1;
                }
            }
        }
        self.jobs = still_running;
    }

    fn job_finished(&mut self, name: &str, status: ExitStatus) {
        if status.success() {
            self.report.jobs_succeeded += 1;
            eprintln!("kedasim: job {name} completed");
        } else {
            self.report.jobs_failed += 1;
            self.event(
                "Warning",
                "BackoffLimitExceeded",
                format!("Job {name} failed: {status}"),
            );
        }
    }

    /// SIGTERM every running job, wait up to the grace period, then kill what is left.
    async fn terminate_jobs(&mut self) {
        for job in &self.jobs {
            if let Some(pid) = job.child.id() {
                // `kill` from the OS keeps this crate free of unsafe signal code.
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
        }
        let deadline = Instant::now() + JOB_TERMINATION_GRACE;
        self.wait_for_jobs(Some(deadline)).await;
    }

    async fn wait_for_jobs(&mut self, deadline: Option<Instant>) {
        for mut job in std::mem::take(&mut self.jobs) {
            let waited = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, job.child.wait()).await,
                None => Ok(job.child.wait().await),
            };
            match waited {
                Ok(Ok(status)) => self.job_finished(&job.name, status),
                Ok(Err(err)) => {
                    eprintln!("kedasim: cannot wait for job {}: {err}", job.name);
                    self.report.jobs_failed += 1;
                }
                Err(_) => {
                    let _ = job.child.kill().await;
                    self.report.jobs_failed += 1;
                    self.event(
                        "Warning",
                        "DeadlineExceeded",
                        format!("Job {} was killed", job.name),
                    );
                }
            }
        }
    }

    fn event(&mut self, kind: &'static str, reason: &'static str, message: String) {
        let at = self.started.elapsed();
        println!(
            "{}",
            event_row(kind, reason, &format_age(at), "keda-operator", &message)
        );
        self.report.events.push(Event {
            kind,
            reason,
            message,
            at,
        });
    }
}

/// The status message and its causes (a bare "transport error" tells nobody anything).
fn error_chain(status: &tonic::Status) -> String {
    let mut message = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

fn stderr_stdio() -> Stdio {
    use std::os::fd::AsFd as _;
    match std::io::stderr().as_fd().try_clone_to_owned() {
        Ok(fd) => Stdio::from(fd),
        Err(_) => Stdio::null(),
    }
}
