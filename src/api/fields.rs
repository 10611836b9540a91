//! Reading a request body field by field: typed reads that name the field on error, the
//! list of fields a route takes, and the model a body names.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::ApiError;

/// Reads typed fields out of a JSON object, naming the field on error.
pub(crate) struct Fields<'a> {
    pub map: &'a Map<String, Value>,
}

impl Fields<'_> {
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ApiError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => T::deserialize(v)
                .map(Some)
                .map_err(|e| ApiError::invalid(key, format!("`{key}` has the wrong type: {e}"))),
        }
    }
}

/// The `model` a request names, if any (a wrong type is the request's error), for
/// routes that read nothing else before they know the model.
pub fn requested_model(body: &Value) -> Result<Option<String>, ApiError> {
    match body.get("model") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::invalid("model", "`model` must be a string")),
    }
}

pub(crate) fn as_object(body: &Value) -> Result<&Map<String, Value>, ApiError> {
    body.as_object()
        .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))
}

pub(crate) fn check_fields(map: &Map<String, Value>, allowed: &[&str]) -> Result<(), ApiError> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::invalid(
            k.clone(),
            format!("`{k}` is not a supported parameter"),
        )),
        None => Ok(()),
    }
}
