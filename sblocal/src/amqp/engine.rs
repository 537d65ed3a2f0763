//! The connection engine: protocol-header and SASL negotiation, then the connection, session and
//! link state machines for one client connection. The application (the broker) sees only
//! complete messages, settlements and credit, through [`Handler`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use fe2o3_amqp_types::definitions::{
    AmqpError, ConnectionError, Error, Fields, Handle, LinkError, Role, SenderSettleMode,
    SessionError,
};
use fe2o3_amqp_types::messaging::{DeliveryState, TargetArchetype};
use fe2o3_amqp_types::performatives::{
    Attach, Begin, ChannelMax, Close, Detach, Disposition, End, Flow, MaxFrameSize, Open,
    Performative, Transfer,
};
use fe2o3_amqp_types::primitives::{Array, Symbol};
use fe2o3_amqp_types::sasl::{SaslCode, SaslInit, SaslMechanisms, SaslOutcome};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::Notify;

use super::frame::{self, FrameError, ProtocolHeader, FRAME_TYPE_AMQP, FRAME_TYPE_SASL};

/// Identifies a link within one connection.
pub type LinkKey = u64;

/// Largest number of frames a client may send on a session before we widen the window again.
const SESSION_WINDOW: u32 = 10_000;
/// Credit we give a client that sends to us; topped up when half is used.
const RECEIVE_CREDIT: u32 = 5_000;

/// Engine settings that do not depend on the application.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub container_id: String,
    /// The largest frame we accept (announced in our `open`).
    pub max_frame_size: u32,
    /// How long to wait for the protocol header and SASL exchange.
    pub handshake_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            container_id: "sblocal".to_string(),
            max_frame_size: 256 * 1024,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// What the application answers to a link attach.
#[derive(Debug, Default, Clone)]
pub struct AttachAccept {
    pub properties: Option<Fields>,
    /// Largest message accepted on a link the client sends on.
    pub max_message_size: Option<u64>,
}

/// A complete message the client sent on a link.
#[derive(Debug, Clone)]
pub struct IncomingMessage {
    pub message_format: u32,
    pub payload: Bytes,
    pub settled: bool,
}

/// A message the application sends on a link.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    pub tag: Vec<u8>,
    pub payload: Vec<u8>,
    /// Sent pre-settled (receive-and-delete, request/response replies).
    pub settled: bool,
}

/// The application side of a connection. Every call is synchronous: the broker's state lives in
/// memory and is never awaited on.
pub trait Handler: Send {
    /// A client attached a link. `attach.role` is the client's role.
    fn attach(&mut self, key: LinkKey, attach: &Attach) -> Result<AttachAccept, Error>;
    /// The link is gone (detached by either side, or its session or connection ended).
    fn detach(&mut self, key: LinkKey);
    /// A complete message arrived. `Ok(Some(state))` settles it with that outcome.
    fn transfer(
        &mut self,
        key: LinkKey,
        message: IncomingMessage,
    ) -> Result<Option<DeliveryState>, Error>;
    /// The client updated or settled one of our deliveries. The returned state is sent back in
    /// a settled disposition.
    fn disposition(
        &mut self,
        key: LinkKey,
        tag: &[u8],
        state: Option<DeliveryState>,
        settled: bool,
    ) -> Option<DeliveryState>;
    /// The link may send up to `credit` messages now; push them to `out`.
    fn outgoing(&mut self, key: LinkKey, credit: u32, out: &mut Vec<OutgoingMessage>);
    /// Asked after every wake-up: `Some` closes the connection with that error.
    fn close_requested(&mut self) -> Option<Error>;
    /// Asked after every wake-up: links to detach now, each with its error.
    fn detach_requested(&mut self) -> Vec<(LinkKey, Error)> {
        Vec::new()
    }
    /// When `detach_requested` will have something to say with no traffic in between (a
    /// grant lapsing): the connection wakes up then.
    fn next_deadline(&self) -> Option<std::time::Instant> {
        None
    }
    /// The connection is gone.
    fn closed(&mut self);
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("framing: {0}")]
    Frame(#[from] FrameError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("handshake timed out")]
    Timeout,
}

/// Serves one connection to its end. Returns `Ok` when the peer closed cleanly.
pub async fn serve<S, H>(
    stream: S,
    handler: H,
    wake: Arc<Notify>,
    config: &EngineConfig,
) -> Result<(), EngineError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    H: Handler,
{
    let mut io = Io::new(stream);
    tokio::time::timeout(config.handshake_timeout, negotiate(&mut io))
        .await
        .map_err(|_| EngineError::Timeout)??;
    let mut connection = Connection::new(handler, config);
    let result = connection.run(&mut io, wake).await;
    connection.handler.closed();
    result
}

/// Largest amount of unprocessed input buffered while a write is pending.
const MAX_BUFFERED_INPUT: usize = 16 * 1024 * 1024;

struct Io<S> {
    reader: ReadHalf<S>,
    writer: WriteHalf<S>,
    input: BytesMut,
    output: BytesMut,
    /// The peer closed its side while we were writing.
    peer_closed: bool,
    /// Input arrived during the last flush and waits to be handled.
    read_while_flushing: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Io<S> {
    fn new(stream: S) -> Self {
        let (reader, writer) = tokio::io::split(stream);
        Self {
            reader,
            writer,
            input: BytesMut::with_capacity(64 * 1024),
            output: BytesMut::with_capacity(64 * 1024),
            peer_closed: false,
            read_while_flushing: false,
        }
    }

    fn reserve_input(&mut self) {
        if self.input.capacity() - self.input.len() < 16 * 1024 {
            self.input.reserve(64 * 1024);
        }
    }

    /// Reads more bytes; `false` at end of stream.
    async fn fill(&mut self) -> Result<bool, EngineError> {
        if self.peer_closed {
            return Ok(false);
        }
        self.reserve_input();
        Ok(self.reader.read_buf(&mut self.input).await? > 0)
    }

    /// Writes all pending output. Keeps reading meanwhile, so a client that writes a lot
    /// before it reads cannot wedge both sides on full socket buffers.
    async fn flush(&mut self) -> Result<(), EngineError> {
        while !self.output.is_empty() {
            self.reserve_input();
            let may_read = !self.peer_closed && self.input.len() < MAX_BUFFERED_INPUT;
            tokio::select! {
                written = self.writer.write(&self.output) => {
                    let written = written?;
                    if written == 0 {
                        return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
                    }
                    self.output.advance(written);
                }
                read = self.reader.read_buf(&mut self.input), if may_read => {
                    if read? == 0 {
                        self.peer_closed = true;
                    }
                    self.read_while_flushing = true;
                }
            }
        }
        self.writer.flush().await?;
        Ok(())
    }

    async fn read_header(&mut self) -> Result<Option<ProtocolHeader>, EngineError> {
        while self.input.len() < 8 {
            if !self.fill().await? {
                return Err(EngineError::Protocol(
                    "closed before protocol header".into(),
                ));
            }
        }
        let header = self.input.split_to(8);
        Ok(ProtocolHeader::parse(&header))
    }

    async fn read_frame(&mut self, max_frame_size: u32) -> Result<frame::RawFrame, EngineError> {
        loop {
            if let Some(frame) = frame::take_frame(&mut self.input, max_frame_size)? {
                return Ok(frame);
            }
            if !self.fill().await? {
                return Err(EngineError::Protocol("closed mid-negotiation".into()));
            }
        }
    }
}

/// Protocol headers and SASL, up to the point where AMQP frames flow.
async fn negotiate<S>(io: &mut Io<S>) -> Result<(), EngineError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match io.read_header().await? {
        Some(ProtocolHeader::Sasl) => {
            io.output.extend_from_slice(&ProtocolHeader::Sasl.bytes());
            sasl_exchange(io).await?;
            match io.read_header().await? {
                Some(ProtocolHeader::Amqp) => {}
                _ => return refuse_header(io).await,
            }
        }
        Some(ProtocolHeader::Amqp) => {}
        _ => return refuse_header(io).await,
    }
    io.output.extend_from_slice(&ProtocolHeader::Amqp.bytes());
    Ok(())
}

/// Answers an unsupported protocol header with the one we speak, then gives up (AMQP 1.0, 2.2).
async fn refuse_header<S>(io: &mut Io<S>) -> Result<(), EngineError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    io.output.extend_from_slice(&ProtocolHeader::Sasl.bytes());
    io.flush().await?;
    Err(EngineError::Protocol("unsupported protocol header".into()))
}

/// Offers the mechanisms Service Bus clients use and accepts any of them: authorisation happens
/// later, per entity, through `$cbs`.
async fn sasl_exchange<S>(io: &mut Io<S>) -> Result<(), EngineError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mechanisms = SaslMechanisms {
        sasl_server_mechanisms: Array(vec![
            Symbol::from("MSSBCBS"),
            Symbol::from("PLAIN"),
            Symbol::from("ANONYMOUS"),
        ]),
    };
    frame::encode_frame(&mut io.output, FRAME_TYPE_SASL, 0, &mechanisms, &[])?;
    io.flush().await?;
    let raw = io.read_frame(frame::MIN_MAX_FRAME_SIZE * 8).await?;
    if raw.frame_type != FRAME_TYPE_SASL {
        return Err(FrameError::UnexpectedType(raw.frame_type).into());
    }
    let init: SaslInit = serde_amqp::from_slice(&raw.body)
        .map_err(|e| EngineError::Protocol(format!("bad sasl-init: {e}")))?;
    let known = ["MSSBCBS", "PLAIN", "ANONYMOUS"].contains(&init.mechanism.as_str());
    let outcome = SaslOutcome {
        code: if known { SaslCode::Ok } else { SaslCode::Auth },
        additional_data: None,
    };
    frame::encode_frame(&mut io.output, FRAME_TYPE_SASL, 0, &outcome, &[])?;
    io.flush().await?;
    if !known {
        return Err(EngineError::Protocol(format!(
            "unsupported SASL mechanism {}",
            init.mechanism.as_str()
        )));
    }
    Ok(())
}

struct Session {
    channel: u16,
    next_incoming_id: u32,
    incoming_window: u32,
    next_outgoing_id: u32,
    next_delivery_id: u32,
    remote_incoming_window: u32,
    handles: HashMap<u32, LinkKey>,
    /// Our deliveries the client has not settled: delivery id -> (link, tag).
    unsettled: BTreeMap<u32, (LinkKey, Vec<u8>)>,
    /// Outcomes for client deliveries, sent as coalesced settled dispositions on flush.
    settle_incoming: Vec<(u32, DeliveryState)>,
    /// Outcomes answering client settlements of our deliveries.
    settle_outgoing: Vec<(u32, DeliveryState)>,
}

struct Partial {
    delivery_id: u32,
    message_format: u32,
    settled: bool,
    payload: BytesMut,
}

struct Link {
    channel: u16,
    handle: u32,
    /// True when we send on this link (the client receives).
    we_send: bool,
    pre_settled: bool,
    credit: u32,
    delivery_count: u32,
    drain: bool,
    max_message_size: u64,
    partial: Option<Partial>,
}

struct Connection<H> {
    handler: H,
    local_max_frame: u32,
    remote_max_frame: u32,
    container_id: String,
    /// We sent our `open`.
    opened: bool,
    /// The client's `open` arrived.
    peer_opened: bool,
    heartbeat: Option<Duration>,
    sessions: HashMap<u16, Session>,
    links: HashMap<LinkKey, Link>,
    next_key: LinkKey,
    /// Set once we sent `close`: the loop ends after flushing.
    closing: bool,
}

/// Whether the connection loop goes on after a frame.
enum Next {
    Continue,
    Stop,
}

impl<H: Handler> Connection<H> {
    fn new(handler: H, config: &EngineConfig) -> Self {
        Self {
            handler,
            local_max_frame: config.max_frame_size,
            remote_max_frame: frame::MIN_MAX_FRAME_SIZE,
            container_id: config.container_id.clone(),
            opened: false,
            peer_opened: false,
            heartbeat: None,
            sessions: HashMap::new(),
            links: HashMap::new(),
            next_key: 1,
            closing: false,
        }
    }

    async fn run<S>(&mut self, io: &mut Io<S>, wake: Arc<Notify>) -> Result<(), EngineError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut heartbeat = tokio::time::interval(Duration::from_secs(3600));
        let mut heartbeat_period = None;
        loop {
            // Handle every complete frame already buffered before touching the socket again.
            loop {
                let raw = match frame::take_frame(&mut io.input, self.local_max_frame) {
                    Ok(Some(raw)) => raw,
                    Ok(None) => break,
                    Err(e) => {
                        self.close_with(io, ConnectionError::FramingError.into(), e.to_string())?;
                        io.flush().await?;
                        return Err(e.into());
                    }
                };
                match self.on_frame(io, raw) {
                    Ok(Next::Continue) => {}
                    Ok(Next::Stop) => {
                        io.flush().await?;
                        return Ok(());
                    }
                    Err(e) => {
                        io.flush().await?;
                        return Err(e);
                    }
                }
            }
            if let Some(error) = self.handler.close_requested() {
                let description = error.description.clone().unwrap_or_default();
                self.close_with(io, error.condition, description)?;
            }
            if !self.closing {
                for (key, error) in self.handler.detach_requested() {
                    self.detach_link(io, key, Some(error))?;
                }
            }
            if !self.closing {
                self.pump(io)?;
            }
            self.flush_dispositions(io)?;
            io.flush().await?;
            if self.closing {
                return Ok(());
            }
            if std::mem::take(&mut io.read_while_flushing) {
                continue;
            }
            if heartbeat_period != self.heartbeat {
                heartbeat_period = self.heartbeat;
                if let Some(period) = heartbeat_period {
                    heartbeat = tokio::time::interval(period);
                    heartbeat.tick().await;
                }
            }
            let deadline = self.handler.next_deadline();
            tokio::select! {
                filled = io.fill() => {
                    if !filled? {
                        return Ok(());
                    }
                }
                _ = wake.notified() => {}
                () = sleep_until(deadline) => {}
                _ = heartbeat.tick(), if heartbeat_period.is_some() => {
                    frame::encode_empty(&mut io.output);
                }
            }
        }
    }

    fn close_with<S>(
        &mut self,
        io: &mut Io<S>,
        condition: fe2o3_amqp_types::definitions::ErrorCondition,
        description: String,
    ) -> Result<(), EngineError> {
        if self.closing {
            return Ok(());
        }
        self.closing = true;
        if !self.opened {
            // A close must follow an open (AMQP 1.0, 2.4.5).
            self.send_open(io)?;
        }
        // All three error fields present: pyamqp reads them positionally.
        let close = Performative::Close(Close {
            error: Some(Error::new(
                condition,
                Some(description),
                Some(Fields::default()),
            )),
        });
        frame::encode_frame(&mut io.output, FRAME_TYPE_AMQP, 0, &close, &[])?;
        Ok(())
    }

    fn send_open<S>(&mut self, io: &mut Io<S>) -> Result<(), EngineError> {
        let open = Performative::Open(Open {
            container_id: self.container_id.clone(),
            hostname: None,
            max_frame_size: MaxFrameSize(self.local_max_frame),
            channel_max: ChannelMax(4999),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        });
        frame::encode_frame(&mut io.output, FRAME_TYPE_AMQP, 0, &open, &[])?;
        self.opened = true;
        Ok(())
    }

    fn protocol_error<S>(
        &mut self,
        io: &mut Io<S>,
        condition: impl Into<fe2o3_amqp_types::definitions::ErrorCondition>,
        description: String,
    ) -> Result<Next, EngineError> {
        self.close_with(io, condition.into(), description)?;
        Ok(Next::Stop)
    }

    /// A session-level performative on a channel no `begin` opened: a protocol violation.
    fn unknown_channel<S>(
        &mut self,
        io: &mut Io<S>,
        performative: &str,
    ) -> Result<Next, EngineError> {
        self.protocol_error(
            io,
            AmqpError::IllegalState,
            format!("{performative} on unknown channel"),
        )
    }

    fn on_frame<S>(&mut self, io: &mut Io<S>, raw: frame::RawFrame) -> Result<Next, EngineError> {
        if self.closing {
            return Ok(Next::Continue);
        }
        let decoded = match frame::decode_amqp(raw) {
            Ok(decoded) => decoded,
            Err(e) => return self.protocol_error(io, AmqpError::DecodeError, e.to_string()),
        };
        let Some(performative) = decoded.performative else {
            return Ok(Next::Continue);
        };
        let channel = decoded.channel;
        if !self.peer_opened && !matches!(performative, Performative::Open(_)) {
            return self.protocol_error(io, AmqpError::IllegalState, "expected open".into());
        }
        match performative {
            Performative::Open(open) => self.on_open(io, open),
            Performative::Begin(begin) => self.on_begin(io, channel, begin),
            Performative::Attach(attach) => self.on_attach(io, channel, attach),
            Performative::Flow(flow) => self.on_flow(io, channel, flow),
            Performative::Transfer(transfer) => {
                self.on_transfer(io, channel, transfer, decoded.payload)
            }
            Performative::Disposition(disposition) => self.on_disposition(io, channel, disposition),
            Performative::Detach(detach) => self.on_detach(io, channel, detach),
            Performative::End(end) => self.on_end(io, channel, end),
            Performative::Close(_) => {
                self.end_all_links();
                if !self.opened {
                    self.send_open(io)?;
                }
                frame::encode_frame(
                    &mut io.output,
                    FRAME_TYPE_AMQP,
                    0,
                    &Performative::Close(Close { error: None }),
                    &[],
                )?;
                self.closing = true;
                Ok(Next::Stop)
            }
        }
    }

    fn on_open<S>(&mut self, io: &mut Io<S>, open: Open) -> Result<Next, EngineError> {
        if self.peer_opened {
            return self.protocol_error(io, AmqpError::IllegalState, "second open".into());
        }
        self.peer_opened = true;
        self.remote_max_frame = open.max_frame_size.0.max(frame::MIN_MAX_FRAME_SIZE);
        // Keep the peer's idle timer happy: send something at half its timeout.
        self.heartbeat = open
            .idle_time_out
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(u64::from(ms) / 2));
        self.send_open(io)?;
        Ok(Next::Continue)
    }

    fn on_begin<S>(
        &mut self,
        io: &mut Io<S>,
        channel: u16,
        begin: Begin,
    ) -> Result<Next, EngineError> {
        if self.sessions.contains_key(&channel) || begin.remote_channel.is_some() {
            return self.protocol_error(
                io,
                ConnectionError::FramingError,
                format!("channel {channel} already in use"),
            );
        }
        let session = Session {
            channel,
            next_incoming_id: begin.next_outgoing_id,
            incoming_window: SESSION_WINDOW,
            next_outgoing_id: 0,
            next_delivery_id: 0,
            remote_incoming_window: begin.incoming_window,
            handles: HashMap::new(),
            unsettled: BTreeMap::new(),
            settle_incoming: Vec::new(),
            settle_outgoing: Vec::new(),
        };
        let reply = Performative::Begin(Begin {
            remote_channel: Some(channel),
            next_outgoing_id: 0,
            incoming_window: SESSION_WINDOW,
            outgoing_window: u32::MAX,
            handle_max: Handle(u32::MAX),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        });
        frame::encode_frame(&mut io.output, FRAME_TYPE_AMQP, channel, &reply, &[])?;
        self.sessions.insert(channel, session);
        Ok(Next::Continue)
    }

    fn on_attach<S>(
        &mut self,
        io: &mut Io<S>,
        channel: u16,
        attach: Attach,
    ) -> Result<Next, EngineError> {
        let Some(session) = self.sessions.get_mut(&channel) else {
            return self.unknown_channel(io, "attach");
        };
        let handle = attach.handle.0;
        if session.handles.contains_key(&handle) {
            return self.protocol_error(
                io,
                SessionError::HandleInUse,
                format!("handle {handle} in use"),
            );
        }
        let key = self.next_key;
        self.next_key += 1;
        let we_send = attach.role == Role::Receiver;
        let result = self.handler.attach(key, &attach);
        let mut reply = Attach {
            name: attach.name.clone(),
            handle: attach.handle.clone(),
            role: if we_send {
                Role::Sender
            } else {
                Role::Receiver
            },
            snd_settle_mode: attach.snd_settle_mode.clone(),
            rcv_settle_mode: attach.rcv_settle_mode.clone(),
            source: attach.source.clone(),
            target: attach.target.clone(),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: if we_send { Some(0) } else { None },
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        match result {
            Ok(accept) => {
                reply.max_message_size = accept.max_message_size;
                reply.properties = accept.properties;
                frame::encode_frame(
                    &mut io.output,
                    FRAME_TYPE_AMQP,
                    channel,
                    &Performative::Attach(reply),
                    &[],
                )?;
                session.handles.insert(handle, key);
                let link = Link {
                    channel,
                    handle,
                    we_send,
                    pre_settled: attach.snd_settle_mode == SenderSettleMode::Settled,
                    credit: 0,
                    delivery_count: 0,
                    drain: false,
                    max_message_size: accept.max_message_size.unwrap_or(u64::MAX),
                    partial: None,
                };
                if !we_send {
                    let delivery_count = attach.initial_delivery_count.unwrap_or(0);
                    let mut link = link;
                    link.delivery_count = delivery_count;
                    link.credit = RECEIVE_CREDIT;
                    let flow = link_flow(session, &link, false);
                    frame::encode_frame(&mut io.output, FRAME_TYPE_AMQP, channel, &flow, &[])?;
                    self.links.insert(key, link);
                } else {
                    self.links.insert(key, link);
                }
            }
            Err(error) => {
                // Refusal: an attach with the terminus we would own left empty, then a closing
                // detach with the reason (AMQP 1.0, 2.6.3).
                if we_send {
                    reply.source = None;
                } else {
                    reply.target = None::<Box<TargetArchetype>>;
                }
                frame::encode_frame(
                    &mut io.output,
                    FRAME_TYPE_AMQP,
                    channel,
                    &Performative::Attach(reply),
                    &[],
                )?;
                let detach = Performative::Detach(Detach {
                    handle: Handle(handle),
                    closed: true,
                    error: Some(error),
                });
                frame::encode_frame(&mut io.output, FRAME_TYPE_AMQP, channel, &detach, &[])?;
                // The handle stays reserved until the client answers the detach.
                session.handles.insert(handle, 0);
                self.handler.detach(key);
            }
        }
        Ok(Next::Continue)
    }

    fn on_flow<S>(
        &mut self,
        io: &mut Io<S>,
        channel: u16,
        flow: Flow,
    ) -> Result<Next, EngineError> {
        let Some(session) = self.sessions.get_mut(&channel) else {
            return self.unknown_channel(io, "flow");
        };
        // Window the client still grants us (AMQP 1.0, 2.5.6).
        session.remote_incoming_window = match flow.next_incoming_id {
            Some(next_incoming) => next_incoming
                .wrapping_add(flow.incoming_window)
                .wrapping_sub(session.next_outgoing_id),
            None => flow.incoming_window,
        };
        let Some(handle) = flow.handle else {
            if flow.echo {
                let reply = session_flow(session);
                frame::encode_frame(&mut io.output, FRAME_TYPE_AMQP, channel, &reply, &[])?;
            }
            return Ok(Next::Continue);
        };
        let Some(key) = session.handles.get(&handle.0).copied() else {
            return self.protocol_error(
                io,
                SessionError::UnattachedHandle,
                format!("flow for handle {}", handle.0),
            );
        };
        let Some(link) = self.links.get_mut(&key) else {
            return Ok(Next::Continue);
        };
        if link.we_send {
            let peer_count = flow.delivery_count.unwrap_or(0);
            let link_credit = flow.link_credit.unwrap_or(0);
            link.credit = peer_count
                .wrapping_add(link_credit)
                .wrapping_sub(link.delivery_count);
            // Credit larger than what the client granted means its count ran behind ours.
            if link.credit > link_credit {
                link.credit = link_credit;
            }
            link.drain = flow.drain;
        }
        if flow.echo {
            let reply = link_flow(session, link, link.drain);
            frame::encode_frame(&mut io.output, FRAME_TYPE_AMQP, channel, &reply, &[])?;
        }
        Ok(Next::Continue)
    }

    fn on_transfer<S>(
        &mut self,
        io: &mut Io<S>,
        channel: u16,
        transfer: Transfer,
        payload: Bytes,
    ) -> Result<Next, EngineError> {
        let Some(session) = self.sessions.get_mut(&channel) else {
            return self.unknown_channel(io, "transfer");
        };
        session.next_incoming_id = session.next_incoming_id.wrapping_add(1);
        session.incoming_window = session.incoming_window.saturating_sub(1);
        if session.incoming_window < SESSION_WINDOW / 2 {
            session.incoming_window = SESSION_WINDOW;
            let reply = session_flow(session);
            frame::encode_frame(&mut io.output, FRAME_TYPE_AMQP, channel, &reply, &[])?;
        }
        let handle = transfer.handle.0;
        let key = match session.handles.get(&handle) {
            Some(0) => return Ok(Next::Continue), // refused link awaiting the client's detach
            Some(key) => *key,
            None => {
                return self.protocol_error(
                    io,
                    SessionError::UnattachedHandle,
                    format!("transfer for handle {handle}"),
                )
            }
        };
        let Some(link) = self.links.get_mut(&key) else {
            return Ok(Next::Continue);
        };
        if link.we_send {
            return self.protocol_error(
                io,
                AmqpError::NotAllowed,
                "transfer on a receiving link".into(),
            );
        }
        if transfer.aborted {
            link.partial = None;
            return Ok(Next::Continue);
        }
        let mut partial = match link.partial.take() {
            Some(partial) => partial,
            None => {
                let Some(delivery_id) = transfer.delivery_id else {
                    return self.protocol_error(
                        io,
                        AmqpError::InvalidField,
                        "transfer without delivery-id".into(),
                    );
                };
                link.credit = link.credit.saturating_sub(1);
                link.delivery_count = link.delivery_count.wrapping_add(1);
                Partial {
                    delivery_id,
                    message_format: transfer.message_format.unwrap_or(0),
                    settled: transfer.settled.unwrap_or(false),
                    payload: BytesMut::new(),
                }
            }
        };
        if transfer.settled == Some(true) {
            partial.settled = true;
        }
        if partial.payload.len() as u64 + payload.len() as u64 > link.max_message_size {
            let error = Error::new(
                LinkError::MessageSizeExceeded,
                Some(format!(
                    "The message exceeds the link's maximum message size of {} bytes.",
                    link.max_message_size
                )),
                Some(Fields::default()),
            );
            return self.detach_link(io, key, Some(error));
        }
        let complete = !transfer.more;
        let message_payload = if complete && partial.payload.is_empty() {
            // Single-frame message: keep the frame's bytes, no copy.
            payload
        } else {
            partial.payload.extend_from_slice(&payload);
            if !complete {
                link.partial = Some(partial);
                return Ok(Next::Continue);
            }
            std::mem::take(&mut partial.payload).freeze()
        };
        if link.credit < RECEIVE_CREDIT / 2 {
            link.credit = RECEIVE_CREDIT;
            let flow = link_flow(session, link, false);
            frame::encode_frame(&mut io.output, FRAME_TYPE_AMQP, channel, &flow, &[])?;
        }
        let settled = partial.settled;
        let message = IncomingMessage {
            message_format: partial.message_format,
            payload: message_payload,
            settled,
        };
        match self.handler.transfer(key, message) {
            Ok(Some(state)) if !settled => {
                session.settle_incoming.push((partial.delivery_id, state));
                Ok(Next::Continue)
            }
            Ok(_) => Ok(Next::Continue),
            Err(error) => self.detach_link(io, key, Some(error)),
        }
    }

    fn on_disposition<S>(
        &mut self,
        io: &mut Io<S>,
        channel: u16,
        disposition: Disposition,
    ) -> Result<Next, EngineError> {
        let Some(session) = self.sessions.get_mut(&channel) else {
            return self.unknown_channel(io, "disposition");
        };
        // The client settling its own sends: we settled those already.
        if disposition.role == Role::Sender {
            return Ok(Next::Continue);
        }
        let first = disposition.first;
        let last = disposition.last.unwrap_or(first);
        if last < first {
            return Ok(Next::Continue);
        }
        // Walk what we track, not the (peer-controlled) range.
        let ids: Vec<u32> = session
            .unsettled
            .range(first..=last)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some((key, tag)) = session.unsettled.get(&id).cloned() else {
                continue;
            };
            let reply =
                self.handler
                    .disposition(key, &tag, disposition.state.clone(), disposition.settled);
            if disposition.settled {
                session.unsettled.remove(&id);
            } else if let Some(state) = reply {
                session.unsettled.remove(&id);
                session.settle_outgoing.push((id, state));
            }
        }
        Ok(Next::Continue)
    }

    fn on_detach<S>(
        &mut self,
        io: &mut Io<S>,
        channel: u16,
        detach: Detach,
    ) -> Result<Next, EngineError> {
        let Some(session) = self.sessions.get_mut(&channel) else {
            return self.unknown_channel(io, "detach");
        };
        let handle = detach.handle.0;
        let Some(key) = session.handles.remove(&handle) else {
            return Ok(Next::Continue);
        };
        if key == 0 {
            // Answer to our refusal: nothing more to say.
            return Ok(Next::Continue);
        }
        session.unsettled.retain(|_, (link, _)| *link != key);
        if self.links.remove(&key).is_some() {
            self.handler.detach(key);
            let reply = Performative::Detach(Detach {
                handle: Handle(handle),
                closed: detach.closed,
                error: None,
            });
            frame::encode_frame(&mut io.output, FRAME_TYPE_AMQP, channel, &reply, &[])?;
        }
        Ok(Next::Continue)
    }

    /// Detaches a link from our side with an error.
    fn detach_link<S>(
        &mut self,
        io: &mut Io<S>,
        key: LinkKey,
        error: Option<Error>,
    ) -> Result<Next, EngineError> {
        let Some(link) = self.links.remove(&key) else {
            return Ok(Next::Continue);
        };
        if let Some(session) = self.sessions.get_mut(&link.channel) {
            // Keep the handle reserved (as refused) until the client's detach arrives.
            session.handles.insert(link.handle, 0);
            session.unsettled.retain(|_, (owner, _)| *owner != key);
        }
        self.handler.detach(key);
        let detach = Performative::Detach(Detach {
            handle: Handle(link.handle),
            closed: true,
            error,
        });
        frame::encode_frame(&mut io.output, FRAME_TYPE_AMQP, link.channel, &detach, &[])?;
        Ok(Next::Continue)
    }

    fn on_end<S>(&mut self, io: &mut Io<S>, channel: u16, _end: End) -> Result<Next, EngineError> {
        let Some(session) = self.sessions.remove(&channel) else {
            return self.unknown_channel(io, "end");
        };
        for key in session.handles.values().copied().filter(|key| *key != 0) {
            if self.links.remove(&key).is_some() {
                self.handler.detach(key);
            }
        }
        frame::encode_frame(
            &mut io.output,
            FRAME_TYPE_AMQP,
            channel,
            &Performative::End(End { error: None }),
            &[],
        )?;
        Ok(Next::Continue)
    }

    fn end_all_links(&mut self) {
        for key in self.links.keys().copied().collect::<Vec<_>>() {
            self.links.remove(&key);
            self.handler.detach(key);
        }
    }

    /// Sends what the application has for links with credit, within session windows.
    fn pump<S>(&mut self, io: &mut Io<S>) -> Result<(), EngineError> {
        let keys: Vec<LinkKey> = self
            .links
            .iter()
            .filter(|(_, link)| link.we_send && (link.credit > 0 || link.drain))
            .map(|(key, _)| *key)
            .collect();
        let mut messages = Vec::new();
        for key in keys {
            let Some(link) = self.links.get_mut(&key) else {
                continue;
            };
            let Some(session) = self.sessions.get_mut(&link.channel) else {
                continue;
            };
            let budget = link.credit.min(session.remote_incoming_window);
            messages.clear();
            if budget > 0 {
                self.handler.outgoing(key, budget, &mut messages);
            }
            let produced = messages.len() as u32;
            for message in messages.drain(..) {
                send_transfer(
                    &mut io.output,
                    session,
                    link,
                    key,
                    message,
                    self.remote_max_frame,
                )?;
            }
            // Drain: nothing more to send, so use up the credit and tell the client.
            if link.drain && produced < budget.max(1) && budget == link.credit {
                link.delivery_count = link.delivery_count.wrapping_add(link.credit);
                link.credit = 0;
                link.drain = false;
                let flow = link_flow(session, link, true);
                frame::encode_frame(&mut io.output, FRAME_TYPE_AMQP, link.channel, &flow, &[])?;
            }
        }
        Ok(())
    }

    fn flush_dispositions<S>(&mut self, io: &mut Io<S>) -> Result<(), EngineError> {
        for session in self.sessions.values_mut() {
            if !session.settle_incoming.is_empty() {
                let settles = std::mem::take(&mut session.settle_incoming);
                write_dispositions(&mut io.output, session.channel, Role::Receiver, settles)?;
            }
            if !session.settle_outgoing.is_empty() {
                let settles = std::mem::take(&mut session.settle_outgoing);
                write_dispositions(&mut io.output, session.channel, Role::Sender, settles)?;
            }
        }
        Ok(())
    }
}

/// Settled dispositions, one per run of consecutive ids with the same outcome.
fn write_dispositions(
    out: &mut BytesMut,
    channel: u16,
    role: Role,
    settles: Vec<(u32, DeliveryState)>,
) -> Result<(), EngineError> {
    let mut iter = settles.into_iter().peekable();
    while let Some((first, state)) = iter.next() {
        let mut last = first;
        while let Some((next, next_state)) = iter.peek() {
            if *next == last.wrapping_add(1) && same_outcome(next_state, &state) {
                last = *next;
                iter.next();
            } else {
                break;
            }
        }
        let disposition = Performative::Disposition(Disposition {
            role: role.clone(),
            first,
            last: (last != first).then_some(last),
            settled: true,
            state: Some(state),
            batchable: false,
        });
        frame::encode_frame(out, FRAME_TYPE_AMQP, channel, &disposition, &[])?;
    }
    Ok(())
}

fn same_outcome(a: &DeliveryState, b: &DeliveryState) -> bool {
    matches!(
        (a, b),
        (DeliveryState::Accepted(_), DeliveryState::Accepted(_))
            | (DeliveryState::Released(_), DeliveryState::Released(_))
    )
}

/// Sleeps until `deadline` (forever without one).
async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

fn session_flow(session: &Session) -> Performative {
    Performative::Flow(Flow {
        next_incoming_id: Some(session.next_incoming_id),
        incoming_window: session.incoming_window,
        next_outgoing_id: session.next_outgoing_id,
        outgoing_window: u32::MAX,
        handle: None,
        delivery_count: None,
        link_credit: None,
        available: None,
        drain: false,
        echo: false,
        properties: None,
    })
}

fn link_flow(session: &Session, link: &Link, drain: bool) -> Performative {
    Performative::Flow(Flow {
        next_incoming_id: Some(session.next_incoming_id),
        incoming_window: session.incoming_window,
        next_outgoing_id: session.next_outgoing_id,
        outgoing_window: u32::MAX,
        handle: Some(Handle(link.handle)),
        delivery_count: Some(link.delivery_count),
        link_credit: Some(link.credit),
        available: None,
        drain,
        echo: false,
        properties: None,
    })
}

/// Writes one delivery as one or more transfer frames, split at the client's max-frame-size.
fn send_transfer(
    out: &mut BytesMut,
    session: &mut Session,
    link: &mut Link,
    key: LinkKey,
    message: OutgoingMessage,
    remote_max_frame: u32,
) -> Result<(), EngineError> {
    let delivery_id = session.next_delivery_id;
    session.next_delivery_id = session.next_delivery_id.wrapping_add(1);
    let settled = message.settled || link.pre_settled;
    let mut transfer = Transfer {
        handle: Handle(link.handle),
        delivery_id: Some(delivery_id),
        delivery_tag: Some(ByteBuf::from(message.tag.clone())),
        message_format: Some(0),
        settled: Some(settled),
        more: false,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted: false,
        batchable: false,
    };
    let overhead = 8 + serde_amqp::serialized_size(&Performative::Transfer(transfer.clone()))
        .map_err(|e| EngineError::Protocol(e.to_string()))?;
    let room = (remote_max_frame as usize).saturating_sub(overhead).max(1);
    let mut rest: &[u8] = &message.payload;
    loop {
        let take = rest.len().min(room);
        let (chunk, remaining) = rest.split_at(take);
        transfer.more = !remaining.is_empty();
        let performative = Performative::Transfer(transfer.clone());
        frame::encode_frame(out, FRAME_TYPE_AMQP, link.channel, &performative, chunk)?;
        session.next_outgoing_id = session.next_outgoing_id.wrapping_add(1);
        session.remote_incoming_window = session.remote_incoming_window.saturating_sub(1);
        rest = remaining;
        if rest.is_empty() {
            break;
        }
    }
    link.delivery_count = link.delivery_count.wrapping_add(1);
    link.credit = link.credit.saturating_sub(1);
    if !settled {
        session.unsettled.insert(delivery_id, (key, message.tag));
    }
    Ok(())
}
