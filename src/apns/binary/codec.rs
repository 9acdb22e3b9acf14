//! The legacy binary interface's bytes (protocol sheet B): command 2 notification frames,
//! error-response packets (command 8) and feedback tuples. Pure: no I/O, tested by byte
//! vectors, round trips and truncated or oversized input. Everything is big-endian.

use bytes::{BufMut, Bytes, BytesMut};

/// Command byte of a notification frame.
pub(crate) const FRAME_COMMAND: u8 = 2;
/// Command byte of an error-response packet.
pub(crate) const ERROR_COMMAND: u8 = 8;
/// An error-response packet's length.
pub(crate) const ERROR_LEN: usize = 6;
/// Device tokens are exactly 32 bytes on this interface.
pub(crate) const TOKEN_LEN: usize = 32;
/// The largest payload command 2 accepts.
pub(crate) const MAX_PAYLOAD: usize = 2048;

const ITEM_TOKEN: u8 = 1;
const ITEM_PAYLOAD: u8 = 2;
const ITEM_IDENTIFIER: u8 = 3;
const ITEM_EXPIRATION: u8 = 4;
const ITEM_PRIORITY: u8 = 5;

/// One notification, as a command 2 frame carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub token: [u8; TOKEN_LEN],
    pub payload: Bytes,
    /// Echoed in an error response; unique per connection.
    pub identifier: u32,
    /// Unix seconds; 0 means "do not store".
    pub expiration: u32,
    /// 10 = now, 5 = power-conserving.
    pub priority: u8,
}

#[cfg(any(test, feature = "kit"))]
/// Why bytes are not a frame (the mock answers these with the matching status).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("not a command 2 frame (command {0})")]
    Command(u8),
    #[error("an item overruns the frame")]
    Truncated,
    #[error("item {0} is unknown or repeated")]
    Item(u8),
    #[error("the frame has no device token")]
    MissingToken,
    #[error("the device token is {0} bytes, not 32")]
    TokenSize(usize),
    #[error("the frame has no payload")]
    MissingPayload,
    #[error("the payload is {0} bytes, over 2048")]
    PayloadSize(usize),
    #[error("item {0} has the wrong length")]
    ItemSize(u8),
}

#[cfg(any(test, feature = "kit"))]
impl FrameError {
    /// The error-response status APNs answers it with.
    pub fn status(&self) -> Status {
        match self {
            FrameError::MissingToken => Status::MissingDeviceToken,
            FrameError::TokenSize(_) => Status::InvalidTokenSize,
            FrameError::MissingPayload => Status::MissingPayload,
            FrameError::PayloadSize(_) => Status::InvalidPayloadSize,
            _ => Status::ProtocolError,
        }
    }
}

/// Appends the frame's bytes (5 header bytes, then the five items) to `out`.
pub(crate) fn encode_frame(frame: &Frame, out: &mut BytesMut) {
    let items_len = 3 * 5 + TOKEN_LEN + frame.payload.len() + 4 + 4 + 1;
    out.reserve(5 + items_len);
    out.put_u8(FRAME_COMMAND);
    out.put_u32(items_len as u32);
    out.put_u8(ITEM_TOKEN);
    out.put_u16(TOKEN_LEN as u16);
    out.put_slice(&frame.token);
    out.put_u8(ITEM_PAYLOAD);
    out.put_u16(frame.payload.len() as u16);
    out.put_slice(&frame.payload);
    out.put_u8(ITEM_IDENTIFIER);
    out.put_u16(4);
    out.put_u32(frame.identifier);
    out.put_u8(ITEM_EXPIRATION);
    out.put_u16(4);
    out.put_u32(frame.expiration);
    out.put_u8(ITEM_PRIORITY);
    out.put_u16(1);
    out.put_u8(frame.priority);
}

#[cfg(any(test, feature = "kit"))]
/// A frame read off the wire: its identifier (0 when absent) and what was wrong, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decoded {
    pub identifier: u32,
    pub frame: Result<Frame, FrameError>,
}

#[cfg(any(test, feature = "kit"))]
/// Reads one frame from the front of `buf`: `Ok(None)` until the whole frame has arrived,
/// else the frame and how many bytes it took. Items may come in any order.
pub(crate) fn decode_frame(buf: &[u8]) -> Result<Option<(Decoded, usize)>, FrameError> {
    let Some(&command) = buf.first() else {
        return Ok(None);
    };
    if command != FRAME_COMMAND {
        return Err(FrameError::Command(command));
    }
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return Ok(None);
    }
    let items = &buf[5..5 + len];
    let (mut token, mut payload, mut identifier, mut expiration, mut priority) =
        (None, None, None, None, None);
    let mut seen = [false; 6];
    let mut at = 0;
    let mut error = None;
    while at < items.len() {
        if items.len() - at < 3 {
            error.get_or_insert(FrameError::Truncated);
            break;
        }
        let id = items[at];
        let n = u16::from_be_bytes([items[at + 1], items[at + 2]]) as usize;
        let Some(data) = items.get(at + 3..at + 3 + n) else {
            error.get_or_insert(FrameError::Truncated);
            break;
        };
        at += 3 + n;
        if !(1..=5).contains(&id) || std::mem::replace(&mut seen[id as usize], true) {
            error.get_or_insert(FrameError::Item(id));
            continue;
        }
        match id {
            ITEM_TOKEN => token = Some(data),
            ITEM_PAYLOAD => payload = Some(data),
            ITEM_IDENTIFIER if n == 4 => {
                identifier = Some(u32::from_be_bytes(data.try_into().unwrap()))
            }
            ITEM_EXPIRATION if n == 4 => {
                expiration = Some(u32::from_be_bytes(data.try_into().unwrap()))
            }
            ITEM_PRIORITY if n == 1 => priority = Some(data[0]),
            other => {
                error.get_or_insert(FrameError::ItemSize(other));
            }
        }
    }
    let frame = match (error, token, payload) {
        (Some(e), _, _) => Err(e),
        (None, None, _) => Err(FrameError::MissingToken),
        (None, Some(t), _) if t.len() != TOKEN_LEN => Err(FrameError::TokenSize(t.len())),
        (None, _, None) => Err(FrameError::MissingPayload),
        (None, _, Some([])) => Err(FrameError::MissingPayload),
        (None, _, Some(p)) if p.len() > MAX_PAYLOAD => Err(FrameError::PayloadSize(p.len())),
        (None, Some(t), Some(p)) => Ok(Frame {
            token: t.try_into().unwrap(),
            payload: Bytes::copy_from_slice(p),
            identifier: identifier.unwrap_or(0),
            expiration: expiration.unwrap_or(0),
            priority: priority.unwrap_or(10),
        }),
    };
    Ok(Some((
        Decoded {
            identifier: identifier.unwrap_or(0),
            frame,
        },
        5 + len,
    )))
}

/// An error-response status (sheet B5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Status {
    NoErrors,
    /// 1: processing error on Apple's side: resend.
    ProcessingError,
    MissingDeviceToken,
    MissingTopic,
    MissingPayload,
    InvalidTokenSize,
    InvalidTopicSize,
    InvalidPayloadSize,
    /// 8: the token is invalid (or from the other environment): purge it.
    InvalidToken,
    /// 10: the server is shutting down; the identifier is the last notification processed.
    Shutdown,
    /// 128: the frame could not be parsed.
    ProtocolError,
    /// 255: none (unknown).
    Unknown,
    Other(u8),
}

impl Status {
    pub(crate) fn from_byte(b: u8) -> Self {
        match b {
            0 => Status::NoErrors,
            1 => Status::ProcessingError,
            2 => Status::MissingDeviceToken,
            3 => Status::MissingTopic,
            4 => Status::MissingPayload,
            5 => Status::InvalidTokenSize,
            6 => Status::InvalidTopicSize,
            7 => Status::InvalidPayloadSize,
            8 => Status::InvalidToken,
            10 => Status::Shutdown,
            128 => Status::ProtocolError,
            255 => Status::Unknown,
            other => Status::Other(other),
        }
    }

    pub(crate) fn byte(self) -> u8 {
        match self {
            Status::NoErrors => 0,
            Status::ProcessingError => 1,
            Status::MissingDeviceToken => 2,
            Status::MissingTopic => 3,
            Status::MissingPayload => 4,
            Status::InvalidTokenSize => 5,
            Status::InvalidTopicSize => 6,
            Status::InvalidPayloadSize => 7,
            Status::InvalidToken => 8,
            Status::Shutdown => 10,
            Status::ProtocolError => 128,
            Status::Unknown => 255,
            Status::Other(b) => b,
        }
    }
}

/// An error-response packet: the status and the identifier it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ErrorResponse {
    pub status: Status,
    pub identifier: u32,
}

impl ErrorResponse {
    /// The packet's six bytes (what the mock's gateway answers with).
    #[cfg(any(test, feature = "kit"))]
    pub fn encode(&self) -> [u8; ERROR_LEN] {
        let id = self.identifier.to_be_bytes();
        [
            ERROR_COMMAND,
            self.status.byte(),
            id[0],
            id[1],
            id[2],
            id[3],
        ]
    }

    /// Reads a packet from exactly six bytes.
    pub(crate) fn decode(b: &[u8; ERROR_LEN]) -> Result<Self, u8> {
        if b[0] != ERROR_COMMAND {
            return Err(b[0]);
        }
        Ok(Self {
            status: Status::from_byte(b[1]),
            identifier: u32::from_be_bytes([b[2], b[3], b[4], b[5]]),
        })
    }
}

/// A feedback tuple: when APNs decided the app was gone, and the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackTuple {
    /// Unix seconds.
    pub time: u32,
    pub token: Vec<u8>,
}

impl FeedbackTuple {
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(self.time);
        out.put_u16(self.token.len() as u16);
        out.put_slice(&self.token);
    }
}

/// Reads every whole tuple at the front of `buf` (the token length is read, not assumed);
/// returns them and how many bytes they took. A partial tuple stays for the next read.
pub(crate) fn decode_tuples(buf: &[u8]) -> (Vec<FeedbackTuple>, usize) {
    let mut tuples = Vec::new();
    let mut at = 0;
    while buf.len() - at >= 6 {
        let time = u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        let n = u16::from_be_bytes([buf[at + 4], buf[at + 5]]) as usize;
        let Some(token) = buf.get(at + 6..at + 6 + n) else {
            break;
        };
        tuples.push(FeedbackTuple {
            time,
            token: token.to_vec(),
        });
        at += 6 + n;
    }
    (tuples, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(id: u32, payload: &'static [u8]) -> Frame {
        let mut token = [0u8; 32];
        for (i, b) in token.iter_mut().enumerate() {
            *b = i as u8;
        }
        Frame {
            token,
            payload: Bytes::from_static(payload),
            identifier: id,
            expiration: 0x6565_6565,
            priority: 10,
        }
    }

    #[test]
    fn a_frame_is_laid_out_byte_for_byte() {
        let mut out = BytesMut::new();
        encode_frame(&frame(42, b"{}"), &mut out);
        let mut want = vec![2, 0, 0, 0, 56 + 2];
        want.extend([1, 0, 32]);
        want.extend(0..32u8);
        want.extend([2, 0, 2, b'{', b'}']);
        want.extend([3, 0, 4, 0, 0, 0, 42]);
        want.extend([4, 0, 4, 0x65, 0x65, 0x65, 0x65]);
        want.extend([5, 0, 1, 10]);
        assert_eq!(&out[..], &want[..]);
        assert_eq!(
            out.len(),
            61 + 2,
            "61 + n bytes per frame, as the sheet says"
        );
    }

    #[test]
    fn frames_round_trip_and_wait_for_all_their_bytes() {
        let frames = [
            frame(1, b"{\"aps\":{}}"),
            frame(u32::MAX, b"x"),
            frame(7, &[b'a'; 2048]),
        ];
        let mut out = BytesMut::new();
        for f in &frames {
            encode_frame(f, &mut out);
        }
        // Every prefix short of a whole frame decodes to "need more".
        let first_len = 61 + frames[0].payload.len();
        for cut in 0..first_len {
            assert_eq!(decode_frame(&out[..cut]), Ok(None), "cut at {cut}");
        }
        let mut at = 0;
        for f in &frames {
            let (d, used) = decode_frame(&out[at..]).unwrap().unwrap();
            assert_eq!(d.frame.as_ref(), Ok(f));
            at += used;
        }
        assert_eq!(at, out.len());
    }

    #[test]
    fn bad_frames_say_what_is_wrong() {
        let mut short_token = vec![2, 0, 0, 0, 0];
        short_token.extend([1, 0, 3, 1, 2, 3, 2, 0, 1, b'x', 3, 0, 4, 0, 0, 0, 9]);
        let n = (short_token.len() - 5) as u8;
        short_token[4] = n;
        let (d, _) = decode_frame(&short_token).unwrap().unwrap();
        assert_eq!(
            (d.identifier, d.frame.clone().unwrap_err()),
            (9, FrameError::TokenSize(3))
        );
        assert_eq!(d.frame.unwrap_err().status(), Status::InvalidTokenSize);

        let mut big = BytesMut::new();
        encode_frame(&frame(3, &[b'a'; 2049]), &mut big);
        let (d, _) = decode_frame(&big).unwrap().unwrap();
        assert_eq!(d.frame.unwrap_err(), FrameError::PayloadSize(2049));

        let mut repeated = vec![2, 0, 0, 0, 8, 5, 0, 1, 10, 5, 0, 1, 10];
        repeated[4] = 8;
        let (d, _) = decode_frame(&repeated).unwrap().unwrap();
        assert_eq!(d.frame.unwrap_err(), FrameError::Item(5));

        let overrun = [2, 0, 0, 0, 3, 1, 0, 32];
        assert_eq!(
            decode_frame(&overrun)
                .unwrap()
                .unwrap()
                .0
                .frame
                .unwrap_err(),
            FrameError::Truncated
        );
        assert_eq!(decode_frame(&[1, 2, 3]), Err(FrameError::Command(1)));
    }

    #[test]
    fn error_responses_round_trip() {
        let packet = ErrorResponse {
            status: Status::InvalidToken,
            identifier: 42,
        };
        assert_eq!(packet.encode(), [8, 8, 0, 0, 0, 42]);
        assert_eq!(ErrorResponse::decode(&[8, 8, 0, 0, 0, 42]), Ok(packet));
        assert_eq!(
            ErrorResponse::decode(&[8, 10, 0, 0, 1, 0]).unwrap().status,
            Status::Shutdown
        );
        assert_eq!(ErrorResponse::decode(&[7, 8, 0, 0, 0, 0]), Err(7));
        for b in 0..=255u8 {
            assert_eq!(Status::from_byte(b).byte(), b);
        }
    }

    #[test]
    fn feedback_tuples_split_at_every_byte_offset_parse_identically() {
        let tuples = vec![
            FeedbackTuple {
                time: 1_795_857_362,
                token: vec![0xab; 32],
            },
            FeedbackTuple {
                time: 7,
                token: vec![1, 2, 3],
            },
            FeedbackTuple {
                time: u32::MAX,
                token: vec![0xcd; 100],
            },
        ];
        let mut wire = BytesMut::new();
        for t in &tuples {
            t.encode(&mut wire);
        }
        assert_eq!(
            &wire[..6],
            &[0x6b, 0x0a, 0x9b, 0xd2, 0, 32],
            "time then length, big-endian"
        );
        for cut in 0..=wire.len() {
            // Two reads: the stream split at `cut`.
            let mut buf = BytesMut::from(&wire[..cut]);
            let (mut got, used) = decode_tuples(&buf);
            let _ = buf.split_to(used);
            buf.extend_from_slice(&wire[cut..]);
            let (rest, used) = decode_tuples(&buf);
            got.extend(rest);
            assert_eq!(used, buf.len(), "cut at {cut}");
            assert_eq!(got, tuples, "cut at {cut}");
        }
    }

    #[test]
    fn random_frames_round_trip() {
        // A property test over generated frames: any token, payload size, id and order.
        let rng = ring::rand::SystemRandom::new();
        let mut out = BytesMut::new();
        let mut sent = Vec::new();
        for _ in 0..200 {
            let mut bytes = [0u8; 32 + 4 + 4 + 2];
            ring::rand::SecureRandom::fill(&rng, &mut bytes).unwrap();
            let size = 1 + (u16::from_be_bytes([bytes[40], bytes[41]]) as usize % MAX_PAYLOAD);
            let f = Frame {
                token: bytes[..32].try_into().unwrap(),
                payload: Bytes::from(vec![b'p'; size]),
                identifier: u32::from_be_bytes(bytes[32..36].try_into().unwrap()),
                expiration: u32::from_be_bytes(bytes[36..40].try_into().unwrap()),
                priority: if bytes[0] % 2 == 0 { 10 } else { 5 },
            };
            encode_frame(&f, &mut out);
            sent.push(f);
        }
        let mut at = 0;
        for f in &sent {
            let (d, used) = decode_frame(&out[at..]).unwrap().unwrap();
            assert_eq!(d.frame.as_ref(), Ok(f));
            at += used;
        }
    }
}
