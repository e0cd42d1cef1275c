//! Admission tokens: signed proof that a buyer was admitted from an event's waiting
//! room, and how long the admission lasts.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use uuid::Uuid;

use crate::domain::Buyer;
use crate::error::{Error, Result};

/// When an admission token expires (Unix ms): `admission_seconds` after the later of
/// the admission and when the buyer could first learn of it: the first time they
/// were told, but no later than `learn_within_ms` after the admission (a buyer who
/// polls as told learns of it within the longest poll interval). So a window starts
/// no later for a buyer who stays away: admissions do not bank.
pub fn admission_expires_ms(
    admitted_at_ms: i64,
    served_at_ms: i64,
    learn_within_ms: i64,
    admission_seconds: u32,
) -> i64 {
    let learned = served_at_ms.min(admitted_at_ms.saturating_add(learn_within_ms));
    admitted_at_ms
        .max(learned)
        .saturating_add(i64::from(admission_seconds) * 1000)
}

/// The claims of an admission token.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Admission {
    sub: String,
    evt: Uuid,
    exp: u64,
}

/// Signs admission tokens (HS256) with the current key and accepts the current and
/// the previous one, so the key can be rotated without downtime: deploy the new key
/// with the old one as previous, and drop the previous after one admission lifetime.
#[derive(Clone)]
pub struct AdmissionTokens {
    signing: EncodingKey,
    accepted: Vec<DecodingKey>,
    validation: Validation,
}

impl AdmissionTokens {
    pub fn new(key: &str, previous: Option<&str>) -> Result<Self> {
        let short = |k: &str| k.len() < 32;
        if short(key) || previous.is_some_and(short) {
            return Err(Error::Startup(
                "BOXOFFICE_ADMISSION_KEY and BOXOFFICE_ADMISSION_KEY_PREVIOUS must be at \
                 least 32 bytes"
                    .into(),
            ));
        }
        let invalid = |e: jsonwebtoken::errors::Error| {
            Error::Startup(format!("BOXOFFICE_ADMISSION_KEY: {e}"))
        };
        let mut accepted = vec![DecodingKey::from_secret(key.as_bytes()).map_err(invalid)?];
        if let Some(previous) = previous {
            accepted.push(DecodingKey::from_secret(previous.as_bytes()).map_err(invalid)?);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 0;
        validation.validate_aud = false;
        Ok(Self {
            signing: EncodingKey::from_secret(key.as_bytes()).map_err(invalid)?,
            accepted,
            validation,
        })
    }

    /// A token admitting `buyer` to `event` until `expires_at_ms` (Unix ms, rounded
    /// down to the second, the resolution of `exp`).
    pub fn issue(&self, event: Uuid, buyer: &Buyer, expires_at_ms: i64) -> Result<String> {
        let exp = u64::try_from(expires_at_ms.div_euclid(1000)).map_err(|_| {
            Error::UnexpectedReply(format!(
                "admission expiring before 1970: {expires_at_ms} ms"
            ))
        })?;
        let claims = Admission {
            sub: buyer.as_str().to_owned(),
            evt: event,
            exp,
        };
        jsonwebtoken::encode(&Header::default(), &claims, &self.signing)
            .map_err(|e| Error::UnexpectedReply(format!("signing an admission token: {e}")))
    }

    /// Whether `token` admits `buyer` to `event` now.
    pub fn admits(&self, token: &str, event: Uuid, buyer: &Buyer) -> bool {
        self.accepted.iter().any(|key| {
            jsonwebtoken::decode::<Admission>(token, key, &self.validation)
                .is_ok_and(|data| data.claims.evt == event && data.claims.sub == buyer.as_str())
        })
    }
}
