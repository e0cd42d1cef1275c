//! How this API's own types appear to poem-openapi: their schemas, and parsing that
//! checks the same rules as the domain types (see `domain`), in plain code.

use poem_openapi::registry::MetaSchema;
use poem_openapi::types::{ParseError, ParseFromJSON, ParseFromParameter, ParseResult, ToJSON};

use crate::domain::{
    HoldSeconds, IdempotencyKey, MAX_HOLD_SECONDS, MAX_KEY_LEN, MAX_QUANTITY, MAX_SEATS, Quantity,
    SeatLimit, Seats,
};

/// Implements poem-openapi's `Type` for a newtype over `String` that has an
/// `as_string(&self) -> &String` method: the given schema documents the rule (a
/// `pattern`, lengths) and the type's own parsing checks it in plain code, because
/// poem-openapi's `pattern` validator compiles its regex on every request (it cost a
/// third of the purchase throughput).
macro_rules! checked_string_type {
    ($ty:ty, $schema:expr) => {
        impl ::poem_openapi::types::Type for $ty {
            const IS_REQUIRED: bool = true;
            type RawValueType = String;
            type RawElementValueType = String;

            fn name() -> ::std::borrow::Cow<'static, str> {
                "string".into()
            }

            fn schema_ref() -> ::poem_openapi::registry::MetaSchemaRef {
                ::poem_openapi::registry::MetaSchemaRef::Inline(Box::new($schema))
            }

            fn as_raw_value(&self) -> Option<&String> {
                Some(self.as_string())
            }

            fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a String> + 'a> {
                Box::new(std::iter::once(self.as_string()))
            }
        }
    };
}

/// Implements poem-openapi's `Type`, `ParseFromJSON` and `ToJSON` for an integer
/// newtype with `get()`, `rule()` and `TryFrom<i64, Error = String>` (see `domain`):
/// the schema's bounds come from the same constants as the check, and only JSON
/// integers are taken (`"1"`, `2.5`, `null` are refused).
macro_rules! checked_integer_type {
    ($ty:ty, $min:expr, $max:expr, $format:literal) => {
        impl ::poem_openapi::types::Type for $ty {
            const IS_REQUIRED: bool = true;
            type RawValueType = Self;
            type RawElementValueType = Self;

            fn name() -> ::std::borrow::Cow<'static, str> {
                concat!("integer_", $format).into()
            }

            fn schema_ref() -> ::poem_openapi::registry::MetaSchemaRef {
                ::poem_openapi::registry::MetaSchemaRef::Inline(Box::new(
                    ::poem_openapi::registry::MetaSchema {
                        format: Some($format),
                        minimum: Some(f64::from($min)),
                        maximum: Some(f64::from($max)),
                        ..::poem_openapi::registry::MetaSchema::new("integer")
                    },
                ))
            }

            fn as_raw_value(&self) -> Option<&Self> {
                Some(self)
            }

            fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Self> + 'a> {
                Box::new(std::iter::once(self))
            }
        }

        impl ::poem_openapi::types::ParseFromJSON for $ty {
            fn parse_from_json(
                value: Option<::serde_json::Value>,
            ) -> ::poem_openapi::types::ParseResult<Self> {
                let n = value
                    .as_ref()
                    .and_then(::serde_json::Value::as_i64)
                    .ok_or_else(|| ::poem_openapi::types::ParseError::custom(<$ty>::rule()))?;
                <$ty>::try_from(n).map_err(::poem_openapi::types::ParseError::custom)
            }
        }

        impl ::poem_openapi::types::ToJSON for $ty {
            fn to_json(&self) -> Option<::serde_json::Value> {
                Some(self.get().into())
            }
        }
    };
}

/// A field a client may leave out but not send as `null` (the schema does not allow
/// it): `Option` would take both.
#[derive(Debug, Clone, Copy)]
pub struct Omittable<T>(pub Option<T>);

impl<T: poem_openapi::types::Type> poem_openapi::types::Type for Omittable<T> {
    const IS_REQUIRED: bool = false;
    type RawValueType = T::RawValueType;
    type RawElementValueType = T::RawElementValueType;

    fn name() -> std::borrow::Cow<'static, str> {
        format!("optional_{}", T::name()).into()
    }

    fn schema_ref() -> poem_openapi::registry::MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut poem_openapi::registry::Registry) {
        T::register(registry);
    }

    fn as_raw_value(&self) -> Option<&Self::RawValueType> {
        self.0.as_ref().and_then(T::as_raw_value)
    }

    fn raw_element_iter<'a>(
        &'a self,
    ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
        match &self.0 {
            Some(value) => value.raw_element_iter(),
            None => Box::new(std::iter::empty()),
        }
    }

    fn is_none(&self) -> bool {
        self.0.is_none()
    }
}

impl<T: poem_openapi::types::ParseFromJSON> poem_openapi::types::ParseFromJSON for Omittable<T> {
    fn parse_from_json(value: Option<serde_json::Value>) -> poem_openapi::types::ParseResult<Self> {
        match value {
            None => Ok(Self(None)),
            Some(serde_json::Value::Null) => Err(poem_openapi::types::ParseError::custom(
                "leave the field out instead of sending null",
            )),
            value => Ok(Self(Some(
                T::parse_from_json(value).map_err(poem_openapi::types::ParseError::propagate)?,
            ))),
        }
    }
}

impl<T: poem_openapi::types::ToJSON> poem_openapi::types::ToJSON for Omittable<T> {
    fn to_json(&self) -> Option<serde_json::Value> {
        self.0.as_ref().and_then(T::to_json)
    }
}

checked_integer_type!(Seats, 1, MAX_SEATS, "int32");

checked_integer_type!(HoldSeconds, 1, MAX_HOLD_SECONDS, "int32");

checked_integer_type!(SeatLimit, 1, MAX_SEATS, "int32");

/// An event's name: a JSON string of 1–200 characters without control characters.
///
/// Not a plain `String`: poem-openapi parses a JSON number or boolean into a `String`,
/// and PostgreSQL refuses a NUL character with an error, not a 400.
#[derive(Debug, Clone)]
pub struct EventName(String);

impl EventName {
    const MAX_CHARS: usize = 200;

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_string(&self) -> &String {
        &self.0
    }
}

impl ParseFromJSON for EventName {
    fn parse_from_json(value: Option<serde_json::Value>) -> ParseResult<Self> {
        let Some(serde_json::Value::String(name)) = value else {
            return Err(ParseError::custom(
                "name must be a string of 1 to 200 characters",
            ));
        };
        let chars = name.chars().count();
        if chars == 0 || chars > Self::MAX_CHARS {
            return Err(ParseError::custom("name must be 1 to 200 characters long"));
        }
        if name.chars().any(char::is_control) {
            return Err(ParseError::custom(
                "name may not contain control characters",
            ));
        }
        Ok(Self(name))
    }
}

impl ToJSON for EventName {
    fn to_json(&self) -> Option<serde_json::Value> {
        Some(serde_json::Value::String(self.0.clone()))
    }
}

checked_string_type!(
    EventName,
    MetaSchema {
        min_length: Some(1),
        max_length: Some(EventName::MAX_CHARS),
        pattern: Some(r"^[^\u0000-\u001F\u007F-\u009F]*$".into()),
        description: Some("1–200 characters, no control characters"),
        ..MetaSchema::new("string")
    }
);

checked_integer_type!(Quantity, 1, MAX_QUANTITY, "int64");

checked_string_type!(
    IdempotencyKey,
    MetaSchema {
        min_length: Some(1),
        max_length: Some(MAX_KEY_LEN),
        // Printable ASCII; no leading or trailing space (HTTP trims those).
        pattern: Some("^[!-~]([ -~]*[!-~])?$".into()),
        ..MetaSchema::new("string")
    }
);

impl ParseFromParameter for IdempotencyKey {
    fn parse_from_parameter(value: &str) -> ParseResult<Self> {
        IdempotencyKey::try_from(value.to_owned()).map_err(ParseError::custom)
    }
}

/// A time of Redis' clock (Unix milliseconds) as the API shows times.
pub fn time_of_ms(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
}
