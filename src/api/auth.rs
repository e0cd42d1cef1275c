//! Who may call: the admin token (creating events, cancelling sales) and the buyer
//! token (events with a limit per buyer), as OpenAPI security schemes, so Swagger UI
//! can authorize with either.

use poem::http::StatusCode;
use poem_openapi::SecurityScheme;
use poem_openapi::auth::Bearer;
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::{ApiError, ErrorCode};
use crate::domain::{Buyer, IdempotencyKey, Quantity};
use crate::gate::Claim;

/// Admin token, configured on the server as `ADMIN_TOKEN`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer")]
pub struct AdminAuth(Bearer);

/// A buyer's JSON Web Token (`sub` names the buyer, `exp` required), signed with the
/// key configured as `BOXOFFICE_BUYER_JWT_KEY`. Needed on events with `maxPerBuyer`;
/// elsewhere optional.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "JWT")]
pub struct BuyerToken(Bearer);

/// A buyer token, or none.
#[derive(SecurityScheme)]
pub enum BuyerAuth {
    BuyerToken(BuyerToken),
    #[oai(fallback)]
    Anonymous,
}

/// Checks the admin token in constant time, so response timing does not reveal how
/// much of a guess was right.
pub fn authorize(state: &AppState, auth: &AdminAuth) -> Result<(), ApiError> {
    let Some(expected) = &state.credentials.admin_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::AdminDisabled,
            "the admin API is disabled: start the server with ADMIN_TOKEN set to enable it",
        ));
    };
    if bool::from(auth.0.token.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "the bearer token is not the server's ADMIN_TOKEN",
        ))
    }
}

/// The buyer a request names, why its token was refused if it was, and whether it
/// carries an admission to the event (queued events need one).
pub struct Identity {
    pub buyer: Option<Buyer>,
    refused: Option<String>,
    pub admitted: bool,
}

impl Identity {
    /// A purchase or hold of `quantity` seats under `key`, as this buyer.
    pub fn claim(&self, key: &IdempotencyKey, quantity: Quantity) -> Claim {
        Claim {
            key: key.clone(),
            quantity,
            buyer: self.buyer.clone(),
            admitted: self.admitted,
        }
    }

    /// Reads the buyer token. A refused token is not an error yet: only an event with
    /// a limit needs a buyer, and the gate says whether it has one.
    pub fn of(state: &AppState, auth: &BuyerAuth) -> Self {
        let BuyerAuth::BuyerToken(token) = auth else {
            return Self {
                buyer: None,
                refused: None,
                admitted: false,
            };
        };
        let verified = match &state.credentials.buyer_tokens {
            Some(tokens) => tokens.verify(&token.0.token).map_err(|e| e.to_string()),
            None => Err("the server has no BOXOFFICE_BUYER_JWT_KEY to check buyer tokens".into()),
        };
        match verified {
            Ok(buyer) => Self {
                buyer: Some(buyer),
                refused: None,
                admitted: false,
            },
            Err(reason) => Self {
                buyer: None,
                refused: Some(reason),
                admitted: false,
            },
        }
    }

    /// The identity of a request for `event` that may carry an `Admission-Token`:
    /// admitted when the token is valid and names this event and this buyer.
    pub fn for_event(
        state: &AppState,
        auth: &BuyerAuth,
        event: uuid::Uuid,
        admission: Option<&str>,
    ) -> Self {
        let mut identity = Self::of(state, auth);
        identity.admitted = match (&identity.buyer, admission, &state.credentials.admissions) {
            (Some(buyer), Some(token), Some(admissions)) => admissions.admits(token, event, buyer),
            _ => false,
        };
        identity
    }

    /// The 403 for a queued event's request without a valid admission.
    pub fn not_admitted(&self) -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::AdmissionRequired,
            "this event is queued: join its waiting room (POST …/queue) and send the \
             Admission-Token it gives you, with the same buyer token",
        )
    }

    /// The 401 for an event that needs a buyer and got none.
    pub fn required(&self) -> ApiError {
        match &self.refused {
            Some(reason) => ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::BuyerTokenInvalid,
                reason,
            ),
            None => ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::BuyerTokenRequired,
                "this event limits seats per buyer: send the buyer's token as \
                 Authorization: Bearer <JWT>",
            ),
        }
    }
}
