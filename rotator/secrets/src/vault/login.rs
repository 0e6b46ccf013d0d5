//! Logging in to Vault and staying logged in.
//!
//! - Token: `lookup-self` at connect (a bad token fails there); when the token is
//!   renewable and has a TTL, `renew-self` at about 2/3 of each lease.
//! - AppRole: `POST auth/MOUNT/login` with the role id and the secret id read from its
//!   file at each login (so a rotated secret id file is picked up), and a new login at
//!   about 2/3 of each lease.
//!
//! A failed renewal is logged (never the token) and retried with backoff, 1 s doubling up
//! to 30 s; the token in use stays in use meanwhile.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use super::Shared;
use crate::error::{Error, Result};
use crate::spec::VaultAuth;
use crate::value::SecretValue;

/// Longest wait between two failed renewal attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Shared {
    /// The first login. Returns the lease to renew, `None` when the token does not expire
    /// (or cannot be renewed, in which case nothing would help).
    pub(super) async fn login_at_connect(&self) -> Result<Option<Duration>> {
        match &self.auth {
            VaultAuth::Token { token } => {
                self.set_token(token.0.duplicate()).await;
                let lookup = {
                    let client = self.client.read().await;
                    vaultrs::token::lookup_self(&*client).await
                }
                .map_err(|e| self.client_error("token lookup", e))?;
                let renewable = lookup.renewable.unwrap_or(false);
                if lookup.ttl == 0 {
                    tracing::debug!(provider = %self.name, "vault token does not expire");
                    return Ok(None);
                }
                if !renewable {
                    tracing::warn!(
                        provider = %self.name,
                        ttl_seconds = lookup.ttl,
                        "vault token is not renewable: it stops working when its TTL ends"
                    );
                    return Ok(None);
                }
                Ok(Some(Duration::from_secs(lookup.ttl)))
            }
            VaultAuth::AppRole { .. } => self.approle_login().await,
        }
    }

    /// Logs in with AppRole; returns the new token's lease.
    async fn approle_login(&self) -> Result<Option<Duration>> {
        let VaultAuth::AppRole {
            role_id,
            secret_id_file,
            mount,
        } = &self.auth
        else {
            return Ok(None);
        };
        let secret_id = std::fs::read_to_string(secret_id_file).map_err(|e| Error::Config {
            provider: self.name.clone(),
            detail: format!("approle secret_id_file {}: {e}", secret_id_file.display()),
        })?;
        let secret_id = Zeroizing::new(secret_id);
        let secret_id = secret_id.trim();
        if secret_id.is_empty() {
            return Err(Error::Config {
                provider: self.name.clone(),
                detail: format!("approle secret_id_file {} is empty", secret_id_file.display()),
            });
        }
        let auth = {
            let client = self.client.read().await;
            vaultrs::auth::approle::login(&*client, mount, role_id, secret_id).await
        }
        .map_err(|e| self.client_error("approle login", e))?;
        let token = SecretValue::from_slice(auth.client_token.as_bytes());
        drop(Zeroizing::new(auth.client_token));
        self.set_token(token).await;
        tracing::debug!(provider = %self.name, lease_seconds = auth.lease_duration, "vault approle login");
        Ok((auth.lease_duration > 0).then(|| Duration::from_secs(auth.lease_duration)))
    }

    /// Renews the token (or logs in again); returns the new lease, `None` when there is
    /// nothing left to renew.
    async fn refresh(&self) -> Result<Option<Duration>> {
        match &self.auth {
            VaultAuth::Token { .. } => {
                let auth = {
                    let client = self.client.read().await;
                    vaultrs::token::renew_self(&*client, None).await
                }
                .map_err(|e| self.client_error("token renewal", e))?;
                drop(Zeroizing::new(auth.client_token));
                Ok((auth.lease_duration > 0).then(|| Duration::from_secs(auth.lease_duration)))
            }
            VaultAuth::AppRole { .. } => self.approle_login().await,
        }
    }
}

/// Renews at about 2/3 of each lease until `cancel` fires (the provider was dropped).
pub(super) async fn keep_alive(shared: Arc<Shared>, lease: Duration, cancel: CancellationToken) {
    let mut wait = lease * 2 / 3;
    let mut backoff = Duration::from_secs(1);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        match shared.refresh().await {
            Ok(Some(lease)) => {
                tracing::debug!(provider = %shared.name, lease_seconds = lease.as_secs(), "vault token renewed");
                wait = lease * 2 / 3;
                backoff = Duration::from_secs(1);
            }
            Ok(None) => {
                tracing::warn!(provider = %shared.name, "vault token can no longer be renewed");
                return;
            }
            Err(e) => {
                tracing::warn!(
                    provider = %shared.name,
                    error = %e,
                    retry_in_seconds = backoff.as_secs(),
                    "vault token renewal failed"
                );
                wait = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
