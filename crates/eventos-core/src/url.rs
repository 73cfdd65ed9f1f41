//! Showing a broker's or a server's URL to people.

/// `url` as it may be shown in a message or a log line: scheme, host,
/// port and path, without the user info (a password never reaches a
/// message) and without the query or fragment (where tokens travel).
/// Every transport and service shows URLs through this one function.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    match scheme {
        Some(scheme) => format!("{scheme}://{host}{path}"),
        None => format!("{host}{path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn no_user_info_no_query_host_and_path_kept() {
        for (url, shown) in [
            (
                "amqp://guest:secret@127.0.0.1:5672/%2f",
                "amqp://127.0.0.1:5672/%2f",
            ),
            ("amqps://u:p@x@h/v", "amqps://h/v"),
            ("amqp://h", "amqp://h"),
            ("smtp://127.0.0.1:2525", "smtp://127.0.0.1:2525"),
            (
                "smtps://user:p%40ss@mail.example:465",
                "smtps://mail.example:465",
            ),
            (
                "smtp://u:p@mail.example:587?tls=required",
                "smtp://mail.example:587",
            ),
            ("nats://tok@h:4222/#frag", "nats://h:4222/"),
            ("mail.example", "mail.example"),
            ("user:pw@mail.example", "mail.example"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}
