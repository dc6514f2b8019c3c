//! Reading the Prometheus text that ferry's processes serve on `/metrics`.

/// The sum of the samples of `series` in `text`: with labels (`name{a="b"}`, as printed), that
/// one series; a bare name, the series of every label set of that name. 0 if none.
pub fn sum_samples(text: &str, series: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(s, _)| *s == series || s.split('{').next() == Some(series))
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        // Not `sum()`: that gives -0 for no samples, which prints as "-0".
        .fold(0.0, |sum, v| sum + v)
}

/// The sum of the samples of metric `name` whose labels include every `label="value"` of
/// `labels`, over every other label. 0 if none.
pub fn sum_where(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let wanted: Vec<String> = labels.iter().map(|(l, v)| format!("{l}=\"{v}\"")).collect();
    text.lines()
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(s, _)| {
            s.split_once('{').is_some_and(|(n, have)| {
                let have: Vec<&str> = have.trim_end_matches('}').split(',').collect();
                n == name && wanted.iter().all(|w| have.contains(&w.as_str()))
            })
        })
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .fold(0.0, |sum, v| sum + v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP receiver_sessions Open sessions.\n\
                        # TYPE receiver_sessions gauge\n\
                        receiver_sessions 2\n\
                        receiver_sessions_rejected_total{reason=\"handshake\"} 1\n\
                        receiver_sessions_rejected_total{reason=\"unauthorized\"} 3\n";

    #[test]
    fn a_bare_name_sums_its_label_sets_and_a_labelled_series_is_itself() {
        assert_eq!(sum_samples(TEXT, "receiver_sessions"), 2.0);
        assert_eq!(sum_samples(TEXT, "receiver_sessions_rejected_total"), 4.0);
        assert_eq!(
            sum_samples(
                TEXT,
                r#"receiver_sessions_rejected_total{reason="unauthorized"}"#
            ),
            3.0
        );
        assert_eq!(
            sum_where(
                TEXT,
                "receiver_sessions_rejected_total",
                &[("reason", "unauthorized")]
            ),
            3.0
        );
        assert_eq!(
            sum_where(TEXT, "receiver_sessions_rejected_total", &[("reason", "x")]),
            0.0
        );
        let none = sum_samples(TEXT, "receiver_batches_total");
        assert!(none == 0.0 && none.is_sign_positive(), "{none}");
    }
}
