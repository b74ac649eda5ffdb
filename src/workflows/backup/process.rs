//! PostgreSQL client programs (pg_dump, psql) run on the host or inside the database
//! container through the Docker Engine's exec API, behind one interface.
//!
//! Programs get explicit argument vectors and never a shell. The password travels in
//! the PGPASSWORD variable of the child's environment, never on a command line.

use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::Docker;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::io::StreamReader;

use crate::config::backup::{PgConnection, PgTools};

/// Maximum stderr tail kept for error messages, in bytes.
const MAX_STDERR: usize = 4096;

/// A client program that failed to start or exited unsuccessfully.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("starting {program} failed: {message}")]
    Start { program: String, message: String },
    #[error("{program} exited with status {status}: {stderr}")]
    Exit {
        program: String,
        status: i64,
        stderr: String,
    },
    #[error("{program} was stopped: {reason}")]
    Stopped { program: String, reason: String },
}

/// A running client program.
pub struct Process {
    pub program: String,
    /// Taken by the caller to feed the program; dropping it closes the program's stdin.
    pub stdin: Option<Pin<Box<dyn AsyncWrite + Send>>>,
    /// Taken by the caller to read the program's output.
    pub stdout: Option<Pin<Box<dyn AsyncRead + Send>>>,
    stderr: Arc<Mutex<String>>,
    exit: Exit,
}

enum Exit {
    Host(tokio::process::Child, tokio::task::JoinHandle<()>),
    Docker {
        docker: Docker,
        exec_id: String,
        pump: tokio::task::JoinHandle<()>,
    },
}

/// Runs client programs for one database server as configured.
#[derive(Clone)]
pub struct PgRunner {
    pub connection: PgConnection,
    docker: Option<Docker>,
}

impl PgRunner {
    /// `docker` must be set when the tools run in a container.
    pub fn new(connection: PgConnection, docker: Option<Docker>) -> PgRunner {
        PgRunner { connection, docker }
    }

    /// Describes where the tools run, for messages.
    pub fn describe(&self) -> String {
        match &self.connection.tools {
            PgTools::Host { .. } => "the host".to_string(),
            PgTools::Docker { container } => format!("container {container}"),
        }
    }

    /// Connection arguments for every client program: host, port and user.
    pub fn connection_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(host) = &self.connection.host {
            args.push(format!("--host={host}"));
            args.push(format!("--port={}", self.connection.port));
        }
        args.push(format!("--username={}", self.connection.user));
        args.push("--no-password".to_string());
        args
    }

    fn environment(&self) -> Vec<(String, String)> {
        let mut env = vec![("PGCONNECT_TIMEOUT".to_string(), "15".to_string())];
        if let Some(password) = &self.connection.password {
            env.push(("PGPASSWORD".to_string(), password.expose().to_string()));
        }
        env
    }

    /// Starts `program` with `args`, piping stdin and stdout as requested.
    pub async fn spawn(
        &self,
        program: &str,
        args: &[String],
        stdin: bool,
    ) -> Result<Process, ProcessError> {
        match &self.connection.tools {
            PgTools::Host { bin_dir } => {
                let path = match bin_dir {
                    Some(dir) => dir.join(program).display().to_string(),
                    None => program.to_string(),
                };
                self.spawn_host(program, &path, args, stdin)
            }
            PgTools::Docker { container } => {
                let docker = self.docker.clone().ok_or_else(|| ProcessError::Start {
                    program: program.to_string(),
                    message: "no Docker engine connection".to_string(),
                })?;
                self.spawn_docker(docker, container, program, args, stdin)
                    .await
            }
        }
    }

    fn spawn_host(
        &self,
        program: &str,
        path: &str,
        args: &[String],
        stdin: bool,
    ) -> Result<Process, ProcessError> {
        let mut command = tokio::process::Command::new(path);
        command
            .args(args)
            .envs(self.environment())
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|err| ProcessError::Start {
            program: program.to_string(),
            message: format!("{path}: {err}"),
        })?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("stderr is piped");
        let sink = stderr.clone();
        let collector = tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while let Ok(read) = tokio::io::AsyncReadExt::read(&mut pipe, &mut buf).await {
                if read == 0 {
                    break;
                }
                keep_tail(&sink, &buf[..read]);
            }
        });
        Ok(Process {
            program: program.to_string(),
            stdin: child
                .stdin
                .take()
                .map(|s| Box::pin(s) as Pin<Box<dyn AsyncWrite + Send>>),
            stdout: child
                .stdout
                .take()
                .map(|s| Box::pin(s) as Pin<Box<dyn AsyncRead + Send>>),
            stderr,
            exit: Exit::Host(child, collector),
        })
    }

    async fn spawn_docker(
        &self,
        docker: Docker,
        container: &str,
        program: &str,
        args: &[String],
        stdin: bool,
    ) -> Result<Process, ProcessError> {
        let env: Vec<String> = self
            .environment()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        spawn_exec(docker, container, program, args, env, stdin).await
    }
}

/// Starts `program` in a running container through the exec API. `env` contains
/// `NAME=value` strings for the program's environment.
pub async fn spawn_exec(
    docker: Docker,
    container: &str,
    program: &str,
    args: &[String],
    env: Vec<String>,
    stdin: bool,
) -> Result<Process, ProcessError> {
    let start_failed = |err: bollard::errors::Error| ProcessError::Start {
        program: program.to_string(),
        message: format!("docker exec in {container}: {err}"),
    };
    let mut cmd = vec![program.to_string()];
    cmd.extend(args.iter().cloned());

    let options = CreateExecOptions {
        cmd: Some(cmd),
        env: Some(env),
        attach_stdin: Some(stdin),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(false),
        ..Default::default()
    };
    let exec = docker
        .create_exec(container, options)
        .await
        .map_err(start_failed)?;
    let start = StartExecOptions {
        detach: false,
        tty: false,
        output_capacity: None,
    };
    let started = docker
        .start_exec(&exec.id, Some(start))
        .await
        .map_err(start_failed)?;
    let StartExecResults::Attached { output, input } = started else {
        return Err(ProcessError::Start {
            program: program.to_string(),
            message: "docker exec started detached".to_string(),
        });
    };

    let stderr = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
    let pump = tokio::spawn(pump_exec_output(output, tx, stderr.clone()));
    let stdout = StreamReader::new(tokio_stream_from(rx));
    Ok(Process {
        program: program.to_string(),
        stdin: stdin.then_some(input),
        stdout: Some(Box::pin(stdout)),
        stderr,
        exit: Exit::Docker {
            docker,
            exec_id: exec.id,
            pump,
        },
    })
}

/// Runs `program` in a container to completion, discarding its stdout.
pub async fn exec_in_container(
    docker: &Docker,
    container: &str,
    program: &str,
    args: &[String],
) -> Result<(), ProcessError> {
    let mut process =
        spawn_exec(docker.clone(), container, program, args, Vec::new(), false).await?;
    let mut stdout = process.stdout.take().expect("stdout is piped");
    let _ = tokio::io::copy(&mut stdout, &mut tokio::io::sink()).await;
    process.wait().await
}

fn tokio_stream_from(
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// Splits the exec's multiplexed output: stdout to the channel, stderr to the tail buffer.
async fn pump_exec_output(
    mut output: Pin<
        Box<
            dyn futures_util::Stream<
                    Item = Result<bollard::container::LogOutput, bollard::errors::Error>,
                > + Send,
        >,
    >,
    tx: mpsc::Sender<std::io::Result<Bytes>>,
    stderr: Arc<Mutex<String>>,
) {
    use bollard::container::LogOutput;
    while let Some(frame) = output.next().await {
        match frame {
            Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
            Ok(LogOutput::StdErr { message }) => keep_tail(&stderr, &message),
            Ok(LogOutput::StdIn { .. }) => {}
            Err(err) => {
                let _ = tx.send(Err(std::io::Error::other(err.to_string()))).await;
                return;
            }
        }
    }
}

/// Appends output to a buffer that keeps only its last [`MAX_STDERR`] bytes.
fn keep_tail(buffer: &Mutex<String>, bytes: &[u8]) {
    let mut text = buffer.lock().expect("stderr buffer lock");
    text.push_str(&String::from_utf8_lossy(bytes));
    if text.len() > MAX_STDERR {
        let mut cut = text.len() - MAX_STDERR;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text.drain(..cut);
    }
}

impl Process {
    /// Returns the last lines the program wrote to stderr.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .expect("stderr buffer lock")
            .trim()
            .to_string()
    }

    /// Waits for the program to exit; a non-zero status is an error carrying its stderr.
    pub async fn wait(self) -> Result<(), ProcessError> {
        let status =
            match self.exit {
                Exit::Host(mut child, collector) => {
                    let status = child.wait().await.map_err(|err| ProcessError::Stopped {
                        program: self.program.clone(),
                        reason: err.to_string(),
                    })?;
                    let _ = collector.await;
                    status.code().map(i64::from).unwrap_or(-1)
                }
                Exit::Docker {
                    docker,
                    exec_id,
                    pump,
                } => {
                    let _ = pump.await;
                    let inspected = docker.inspect_exec(&exec_id).await.map_err(|err| {
                        ProcessError::Stopped {
                            program: self.program.clone(),
                            reason: format!("inspecting the exec failed: {err}"),
                        }
                    })?;
                    inspected.exit_code.unwrap_or(-1)
                }
            };
        if status == 0 {
            return Ok(());
        }
        Err(ProcessError::Exit {
            program: self.program,
            status,
            stderr: self
                .stderr
                .lock()
                .expect("stderr buffer lock")
                .trim()
                .to_string(),
        })
    }

    /// Stops the program. A host process is killed.
    ///
    /// NOTE: the exec API cannot signal a process, so an exec'd pg_dump only stops when
    /// a write to its closed output fails, and an exec'd psql when its stdin closes.
    pub async fn kill(self) {
        match self.exit {
            Exit::Host(mut child, collector) => {
                let _ = child.kill().await;
                collector.abort();
            }
            Exit::Docker { pump, .. } => pump.abort(),
        }
    }
}
