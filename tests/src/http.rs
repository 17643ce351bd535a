//! A plain HTTP client for tests: every status is an answer, not an error.

use std::time::Duration;

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// A header parsed as a number; panics naming the header if it is missing or not one.
    pub fn number(&self, name: &str) -> u64 {
        let value = self
            .header(name)
            .unwrap_or_else(|| panic!("no {name} header: {self:?}"));
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name} is not a number: {value:?}"))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?} {:?}", self.status, self.headers, self.body)
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .max_idle_connections(0)
        .build()
        .into()
}

fn finish(response: ureq::http::Response<ureq::Body>) -> Result<Response, ureq::Error> {
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = response.into_body().read_to_string()?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// `GET url` on a fresh connection.
pub fn get(url: &str) -> Result<Response, ureq::Error> {
    finish(agent().get(url).call()?)
}

/// `GET url` with extra headers, on a fresh connection.
pub fn get_with(url: &str, headers: &[(&str, &str)]) -> Result<Response, ureq::Error> {
    let mut request = agent().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    finish(request.call()?)
}

/// `POST url` with a JSON body, on a fresh connection.
pub fn post_json(url: &str, body: &serde_json::Value) -> Result<Response, ureq::Error> {
    finish(
        agent()
            .post(url)
            .header("content-type", "application/json")
            .send(body.to_string())?,
    )
}

/// `POST url` with a JSON body and the test check token, as a filter calls the check
/// address.
pub fn post_check(url: &str, body: &serde_json::Value) -> Result<Response, ureq::Error> {
    let credential = format!("Bearer {}", crate::controller::CHECK_TOKEN);
    request(
        "POST",
        url,
        &[("authorization", credential.as_str())],
        Some(body.to_string()),
    )
}

/// `method url` with `headers` and a JSON `body`, on a fresh connection.
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> Result<Response, ureq::Error> {
    let method = ureq::http::Method::from_bytes(method.as_bytes())
        .map_err(|e| ureq::Error::BadUri(e.to_string()))?;
    let mut request = ureq::http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(body.unwrap_or_default())
        .map_err(|e| ureq::Error::BadUri(e.to_string()))?;
    finish(agent().run(request)?)
}
