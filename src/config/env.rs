//! `${VAR}` and `${VAR:-default}` in the cascade file, resolved from the environment.

use super::Check;

impl Check<'_> {
    /// Expands every `${...}`; `Err(VAR)` names the first unset variable. An empty value
    /// counts as unset.
    pub(super) fn expand(&self, text: &str) -> Result<String, String> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                out.push_str(&rest[start..]);
                return Ok(out);
            };
            let inner = &after[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            match ((self.env)(name).filter(|v| !v.is_empty()), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => return Err(name.to_string()),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_variables_with_defaults() {
        let env = |n: &str| (n == "HOST").then(|| "10.1.1.1".to_string());
        let check = Check {
            origin: "t",
            env: &env,
            warnings: vec![],
            unset: vec![],
        };
        assert_eq!(
            check.expand("http://${HOST}:1/x").as_deref(),
            Ok("http://10.1.1.1:1/x")
        );
        assert_eq!(check.expand("${PORT:-80}").as_deref(), Ok("80"));
        assert_eq!(check.expand("${NOPE}"), Err("NOPE".to_string()));
    }
}
