//! The metric names a PromQL expression selects, found without a full parser: enough of the
//! language's lexical structure to tell a metric name from a function, an aggregation, a
//! keyword, a label name, a duration or a Grafana variable.

/// Aggregation operators: followed by `by (…)`, `without (…)` or their arguments.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// Keywords that take a parenthesised list of label names.
const LABEL_LIST_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Other words that are never metric names.
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "offset", "bool", "inf", "nan", "start", "end",
];

/// The metric names `expr` selects, in order of appearance (repeats kept).
///
/// Grafana's `label_values(metric, label)` template query is understood too: its first argument
/// is the selector, its second a label name.
pub fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    scan(expr.as_bytes(), &mut names);
    names
}

fn scan(s: &[u8], names: &mut Vec<String>) {
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        match c {
            b'"' | b'\'' | b'`' => i = skip_string(s, i),
            // Label matchers and range / subquery durations hold no metric names.
            b'{' => i = skip_balanced(s, i, b'{', b'}'),
            b'[' => i = skip_balanced(s, i, b'[', b']'),
            b'#' => {
                while i < s.len() && s[i] != b'\n' {
                    i += 1;
                }
            }
            // A Grafana variable: `$side`, `${side}`, `$__rate_interval`.
            b'$' => {
                i += 1;
                if i < s.len() && s[i] == b'{' {
                    i = skip_balanced(s, i, b'{', b'}');
                } else {
                    while i < s.len() && is_ident(s[i]) {
                        i += 1;
                    }
                }
            }
            // A number or a duration (`0.99`, `1e3`, `5m`, `0x1f`).
            b'0'..=b'9' | b'.' => {
                while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'.' || s[i] == b'_')
                {
                    i += 1;
                }
            }
            c if is_ident_start(c) => {
                let start = i;
                while i < s.len() && is_ident(s[i]) {
                    i += 1;
                }
                let word = std::str::from_utf8(&s[start..i]).expect("ASCII identifier");
                let next = skip_ws(s, i);
                let opens = next < s.len() && s[next] == b'(';
                if LABEL_LIST_KEYWORDS.contains(&word) {
                    if opens {
                        i = skip_balanced(s, next, b'(', b')');
                    }
                } else if word == "label_values" && opens {
                    let end = skip_balanced(s, next, b'(', b')');
                    let args = &s[next + 1..end.saturating_sub(1)];
                    // label_values(label) names a label only; label_values(selector, label)
                    // starts with a selector.
                    if let Some(comma) = top_level_comma(args) {
                        scan(&args[..comma], names);
                    }
                    i = end;
                } else if opens || AGGREGATIONS.contains(&word) || KEYWORDS.contains(&word) {
                    // A function's or an aggregation's name; its arguments are scanned next.
                } else {
                    names.push(word.to_owned());
                }
            }
            _ => i += 1,
        }
    }
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && s[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// From an opening quote at `i` to just past its closing quote (backslash escapes honoured,
/// except in backtick strings, which have none).
fn skip_string(s: &[u8], i: usize) -> usize {
    let quote = s[i];
    let mut j = i + 1;
    while j < s.len() {
        if s[j] == b'\\' && quote != b'`' {
            j += 2;
            continue;
        }
        if s[j] == quote {
            return j + 1;
        }
        j += 1;
    }
    s.len()
}

/// From an opening bracket at `i` to just past its matching closing bracket.
fn skip_balanced(s: &[u8], i: usize, open: u8, close: u8) -> usize {
    let mut depth = 0usize;
    let mut j = i;
    while j < s.len() {
        match s[j] {
            b'"' | b'\'' | b'`' => {
                j = skip_string(s, j);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    s.len()
}

fn top_level_comma(s: &[u8]) -> Option<usize> {
    let mut j = 0;
    while j < s.len() {
        match s[j] {
            b'"' | b'\'' | b'`' => {
                j = skip_string(s, j);
                continue;
            }
            b'(' => j = skip_balanced(s, j, b'(', b')'),
            b'{' => j = skip_balanced(s, j, b'{', b'}'),
            b'[' => j = skip_balanced(s, j, b'[', b']'),
            b',' => return Some(j),
            _ => j += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::metric_names;

    #[test]
    fn finds_metrics_inside_functions_and_aggregations() {
        assert_eq!(
            metric_names(
                r#"histogram_quantile(0.99, sum by (le, op) (rate(mqc_arbiter_seconds_bucket{op="claim"}[5m])))"#
            ),
            ["mqc_arbiter_seconds_bucket"]
        );
        assert_eq!(
            metric_names("sum(rate(a_total[1m])) without (instance) / on (side) group_left (x) b"),
            ["a_total", "b"]
        );
    }

    #[test]
    fn skips_labels_strings_keywords_durations_and_variables() {
        assert_eq!(
            metric_names(
                r#"up{job="x or y"} == 0 and bool offset 5m or max_over_time(m{side=~"$side"}[$__rate_interval] @ end())"#
            ),
            ["up", "m"]
        );
        assert_eq!(metric_names("topk(10, x) * 100 > 1e3"), ["x"]);
        assert_eq!(metric_names("sum by(side)(y)"), ["y"]);
    }

    #[test]
    fn understands_grafana_label_values() {
        assert_eq!(
            metric_names("label_values(mqc_messages_total{fate=\"dead\"}, side)"),
            ["mqc_messages_total"]
        );
        assert!(metric_names("label_values(side)").is_empty());
    }

    #[test]
    fn a_misspelt_name_is_reported() {
        assert_eq!(
            metric_names("rate(mqc_mesages_total[5m])"),
            ["mqc_mesages_total"]
        );
    }
}
