//! The sharer's consent policy: whether to serve a requester, answered
//! automatically so no human needs to tap "allow".

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Consent {
    pub accept: bool,
    /// Distinct requesters at once; 0 = no limit.
    pub max_requesters: u32,
}

impl Default for Consent {
    fn default() -> Self {
        Consent {
            accept: true,
            max_requesters: 0,
        }
    }
}

impl Consent {
    /// `Err` carries the reason the requester is shown.
    pub fn decide(&self, active_requesters: u32) -> Result<(), String> {
        if !self.accept {
            return Err("sharer is not accepting requesters".into());
        }
        if self.max_requesters > 0 && active_requesters >= self.max_requesters {
            return Err(format!(
                "sharer at capacity ({active_requesters}/{} requesters)",
                self.max_requesters
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decides() {
        assert_eq!(Consent::default().decide(100), Ok(()));
        let c = Consent {
            accept: true,
            max_requesters: 2,
        };
        assert_eq!(c.decide(1), Ok(()));
        assert!(c.decide(2).is_err());
        let c = Consent {
            accept: false,
            max_requesters: 0,
        };
        assert!(c.decide(0).is_err());
    }
}
