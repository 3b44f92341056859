//! Content codings: responses compressed as the client's `Accept-Encoding` allows (`zstd`,
//! `gzip`), and request bodies sent with `Content-Encoding: gzip` decoded within
//! `server.max_body_bytes`.
//!
//! The framing is flate2's and zstd's; what is ours is when to flush. A streamed (NDJSON)
//! response is compressed as it goes and flushed whenever the lookup has no line ready (a
//! window resolved, the next still at the upstream), so lines reach the client as they
//! resolve, as they do uncompressed; while lines are ready they are compressed together, so
//! a stream of hits compresses as well as one buffer. A whole (JSON) response is compressed
//! at once, when it is at least `server.compress_min_bytes`: below that the bytes saved are
//! not worth the CPU.
//!
//! Decoding is bounded twice: the compressed body by `server.max_body_bytes` as it is read,
//! and the decoded bytes by the same bound, reading stopping there (a small body that
//! inflates to gigabytes, a zip bomb, gets `413` after `max_body_bytes` of work).

use super::Body;
use crate::error::Error;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Response;
use hyper::body::{Body as HttpBody, Frame};
use hyper::header::{self, HeaderMap, HeaderValue};
use std::convert::Infallible;
use std::io::{Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

/// A content coding the proxy speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Coding {
    /// `zstd` (RFC 8878): preferred, smaller and cheaper than gzip at its default level.
    Zstd,
    /// `gzip`.
    Gzip,
}

impl Coding {
    fn name(self) -> &'static str {
        match self {
            Self::Zstd => "zstd",
            Self::Gzip => "gzip",
        }
    }
}

/// zstd's level: its default, fast at about gzip's ratio or better.
const ZSTD_LEVEL: i32 = 3;

/// Above this many bytes of encoder output, a chunk goes out even while lines keep coming:
/// a big stream of hits is sent in pieces, not held whole.
const CHUNK: usize = 32 * 1024;

/// The coding to answer with: the one the client weighs highest among those it accepts
/// (`q` > 0), `zstd` before `gzip` at equal weight; `None` for identity.
pub(crate) fn negotiate(headers: &HeaderMap) -> Option<Coding> {
    let mut best: Option<(Coding, u16)> = None;
    let offers = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','));
    let mut wildcard = None;
    let mut named = Vec::new();
    for offer in offers {
        let mut parts = offer.split(';');
        let name = parts.next().unwrap_or_default().trim();
        let weight = parts
            .filter_map(|param| param.trim().strip_prefix("q="))
            .find_map(quality)
            .unwrap_or(1000);
        match name.to_ascii_lowercase().as_str() {
            "zstd" => named.push((Coding::Zstd, weight)),
            "gzip" | "x-gzip" => named.push((Coding::Gzip, weight)),
            "*" => wildcard = Some(weight),
            _ => {}
        }
    }
    for coding in [Coding::Zstd, Coding::Gzip] {
        let weight = named
            .iter()
            .find(|(named, _)| *named == coding)
            .map(|(_, weight)| *weight)
            .or(wildcard);
        if let Some(weight) = weight.filter(|weight| *weight > 0)
            && best.is_none_or(|(_, best)| weight > best)
        {
            best = Some((coding, weight));
        }
    }
    best.map(|(coding, _)| coding)
}

/// A `q` value in thousandths (`q=0.5` is 500); `None` when it is not one.
fn quality(raw: &str) -> Option<u16> {
    let value: f64 = raw.trim().parse().ok()?;
    (0.0..=1.0)
        .contains(&value)
        .then(|| (value * 1000.0).round() as u16)
}

/// `response`, compressed with `coding` when it is worth it: a `200` JSON body of at least
/// `min_bytes`, or any NDJSON stream.
pub(crate) fn compress(
    response: Response<Body>,
    coding: Option<Coding>,
    min_bytes: usize,
) -> Response<Body> {
    let Some(coding) = coding else {
        return response;
    };
    let headers = response.headers();
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let streamed = media.starts_with("application/x-ndjson");
    let len = response.body().size_hint().exact();
    let big_enough = len.is_some_and(|len| len >= min_bytes as u64);
    let worth_it = media.starts_with("application/json") && big_enough || streamed;
    if !worth_it {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(coding.name()),
    );
    parts
        .headers
        .append(header::VARY, HeaderValue::from_static("accept-encoding"));
    let encoded = match Encoder::new(coding, len) {
        Ok(encoder) => Encoded {
            inner: body,
            encoder: Some(encoder),
            pending: false,
        },
        // zstd could not allocate its context: send it as it is rather than fail.
        Err(_) => {
            parts.headers.remove(header::CONTENT_ENCODING);
            return Response::from_parts(parts, body);
        }
    };
    Response::from_parts(parts, encoded.boxed_unsync())
}

/// One coding's encoder, writing into a buffer the body takes from.
enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

impl Encoder {
    /// An encoder for a body of `len` bytes when known: zstd then sizes its tables for it
    /// (a 1 KiB answer does not set up what a 10 MB stream needs) and records the size.
    fn new(coding: Coding, len: Option<u64>) -> std::io::Result<Self> {
        Ok(match coding {
            Coding::Gzip => Self::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::default(),
            )),
            Coding::Zstd => {
                let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL)?;
                encoder.set_pledged_src_size(len)?;
                Self::Zstd(encoder)
            }
        })
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Gzip(encoder) => encoder.write_all(data),
            Self::Zstd(encoder) => encoder.write_all(data),
        }
    }

    /// Makes everything written so far decodable by the client (a sync flush, a zstd
    /// block end), without ending the stream.
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Gzip(encoder) => encoder.flush(),
            Self::Zstd(encoder) => encoder.flush(),
        }
    }

    /// The bytes made since the last call.
    fn take(&mut self) -> Bytes {
        let buffer = match self {
            Self::Gzip(encoder) => encoder.get_mut(),
            Self::Zstd(encoder) => encoder.get_mut(),
        };
        Bytes::from(std::mem::take(buffer))
    }

    fn buffered(&mut self) -> usize {
        match self {
            Self::Gzip(encoder) => encoder.get_ref().len(),
            Self::Zstd(encoder) => encoder.get_ref().len(),
        }
    }

    /// Ends the stream: the last bytes, trailer included.
    fn finish(self) -> std::io::Result<Bytes> {
        let rest = match self {
            Self::Gzip(encoder) => encoder.finish()?,
            Self::Zstd(encoder) => encoder.finish()?,
        };
        Ok(Bytes::from(rest))
    }
}

/// A body compressed as it is polled (see the module doc for when it flushes).
struct Encoded {
    inner: Body,
    /// `None` once finished.
    encoder: Option<Encoder>,
    /// Bytes written since the last flush.
    pending: bool,
}

impl HttpBody for Encoded {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        loop {
            let Some(encoder) = this.encoder.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // trailers: none are sent
                    };
                    // Writing into a Vec cannot fail; a failure would be a bug of the codec,
                    // and the response then ends short rather than lie.
                    if encoder.write(&data).is_err() {
                        this.encoder = None;
                        return Poll::Ready(None);
                    }
                    this.pending = true;
                    if encoder.buffered() >= CHUNK {
                        return Poll::Ready(Some(Ok(Frame::data(encoder.take()))));
                    }
                }
                Poll::Ready(None) => {
                    let rest = this.encoder.take().map(Encoder::finish);
                    return match rest {
                        Some(Ok(rest)) if !rest.is_empty() => {
                            Poll::Ready(Some(Ok(Frame::data(rest))))
                        }
                        _ => Poll::Ready(None),
                    };
                }
                Poll::Pending if this.pending => {
                    // Nothing more ready now: what was written goes out, decodable.
                    this.pending = false;
                    if encoder.flush().is_err() {
                        this.encoder = None;
                        return Poll::Ready(None);
                    }
                    let chunk = encoder.take();
                    if !chunk.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(chunk))));
                    }
                    return Poll::Pending;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.encoder.is_none()
    }
}

/// Whether the request body is gzipped (`Content-Encoding`): the one coding the proxy
/// reads besides `identity`.
///
/// # Errors
/// Any other coding, or a header that is not text: `415`.
pub(super) fn gzipped(headers: &HeaderMap) -> Result<bool, Error> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(false);
    };
    let Ok(value) = value.to_str() else {
        let shown = String::from_utf8_lossy(value.as_bytes()).into_owned();
        return Err(Error::UnsupportedEncoding(shown));
    };
    let value = value.trim();
    if value.eq_ignore_ascii_case("identity") || value.is_empty() {
        Ok(false)
    } else if value.eq_ignore_ascii_case("gzip") || value.eq_ignore_ascii_case("x-gzip") {
        Ok(true)
    } else {
        Err(Error::UnsupportedEncoding(value.to_owned()))
    }
}

/// A gzipped `body` decoded, at most `max` bytes of it.
///
/// # Errors
/// More than `max` decoded bytes (`413`), or a body that is not gzip (`400`).
pub(super) fn gunzip(body: &[u8], max: usize) -> Result<Bytes, Error> {
    let mut decoded = Vec::new();
    // One byte past the bound tells "exactly max" from "more": reading stops there.
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    flate2::read::GzDecoder::new(body)
        .take(limit)
        .read_to_end(&mut decoded)
        .map_err(|err| {
            Error::InvalidRequest(format!("the gzip request body could not be decoded: {err}"))
        })?;
    if decoded.len() > max {
        return Err(Error::PayloadTooLarge { max });
    }
    Ok(Bytes::from(decoded))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn the_highest_weighted_coding_wins_and_zstd_breaks_ties() {
        assert_eq!(negotiate(&accept("gzip, zstd")), Some(Coding::Zstd));
        assert_eq!(negotiate(&accept("gzip, deflate, br")), Some(Coding::Gzip));
        assert_eq!(
            negotiate(&accept("zstd;q=0.5, gzip;q=0.8")),
            Some(Coding::Gzip)
        );
        assert_eq!(negotiate(&accept("*")), Some(Coding::Zstd));
        assert_eq!(negotiate(&accept("*;q=0.1, zstd;q=0")), Some(Coding::Gzip));
    }

    #[test]
    fn identity_only_or_nothing_acceptable_means_no_coding() {
        assert_eq!(negotiate(&HeaderMap::new()), None);
        assert_eq!(negotiate(&accept("identity")), None);
        assert_eq!(negotiate(&accept("br")), None);
        assert_eq!(negotiate(&accept("gzip;q=0, zstd;q=0")), None);
        assert_eq!(negotiate(&accept("gzip;q=nonsense")), Some(Coding::Gzip));
    }

    #[test]
    fn a_body_inflating_past_the_bound_is_refused_and_one_within_it_is_whole() {
        let plain = vec![b'a'; 10_000];
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(&plain).unwrap();
        let gzipped = encoder.finish().unwrap();
        assert_eq!(gunzip(&gzipped, 10_000).unwrap().len(), 10_000);
        assert!(matches!(
            gunzip(&gzipped, 9_999),
            Err(Error::PayloadTooLarge { max: 9_999 })
        ));
        assert!(matches!(
            gunzip(b"not gzip", 100),
            Err(Error::InvalidRequest(_))
        ));
    }

    #[test]
    fn a_content_encoding_that_is_not_text_is_refused_not_taken_for_identity() {
        let mut headers = HeaderMap::new();
        let value = HeaderValue::from_bytes(b"gz\xffip").unwrap();
        headers.insert(header::CONTENT_ENCODING, value);
        assert!(matches!(
            gzipped(&headers),
            Err(Error::UnsupportedEncoding(_))
        ));
    }
}
