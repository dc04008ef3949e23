//! Elastic Load Balancing v2 for the AWS provider: a public endpoint's load balancer
//! (application for http, network for tcp), its target group of instances and its listener,
//! all named `outpost-<hash>` (names are at most 32 characters) and tagged with the stack,
//! resource and endpoint. One found under that name without the stack's tag is someone else's
//! and is refused.

use super::{Aws, Counted, RESOURCE_TAG, STACK_TAG};
use crate::rollout::vm::provider::{Balancer, BalancerSpec, CloudError, CloudResult};
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_elasticloadbalancingv2::types as elb;
use std::collections::BTreeSet;

pub const ENDPOINT_TAG: &str = "outpost:endpoint";

/// What stands for one endpoint in the cloud.
#[derive(Debug, Clone)]
pub(super) struct Made {
    group_arn: String,
    dns: String,
}

/// The name of the endpoint's balancer and target group.
fn name(spec: &BalancerSpec) -> String {
    name_of(&spec.stack, &spec.resource, &spec.endpoint)
}

fn name_of(stack: &str, resource: &str, endpoint: &str) -> String {
    let hash =
        outpost_bundle_format::crypto::sha256(format!("{stack}/{resource}/{endpoint}").as_bytes());
    let hash: String = hash[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("{NAME_PREFIX}{hash}")
}

const NAME_PREFIX: &str = "outpost-";

/// A describe by name: `None` when the service answers `missing` (the name is free, an
/// answer counted as a success), else counted as any call.
fn found<T, E>(
    answer: Result<T, aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>>,
    aws: &Aws,
    call: &'static str,
    missing: &str,
) -> CloudResult<Option<T>>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    if matches!(&answer, Err(e) if e.as_service_error().and_then(|s| s.code()) == Some(missing)) {
        aws.metrics.cloud_call(call, true);
        return Ok(None);
    }
    answer.counted(aws, call).map(Some)
}

impl Aws {
    fn cached(&self, spec: &BalancerSpec) -> Option<Made> {
        self.balancers.lock().ok()?.get(&name(spec)).cloned()
    }

    /// The balancer, made or adopted once per process.
    async fn made(&self, spec: &BalancerSpec) -> CloudResult<Made> {
        if let Some(made) = self.cached(spec) {
            return Ok(made);
        }
        let made = self.make_balancer(spec).await?;
        if let Ok(mut balancers) = self.balancers.lock() {
            balancers.insert(name(spec), made.clone());
        }
        Ok(made)
    }

    pub(super) async fn ensure_balancer(&self, spec: &BalancerSpec) -> CloudResult<Balancer> {
        // A target group deleted behind the agent's back is made again at once.
        for _ in 0..2 {
            let made = self.made(spec).await?;
            let health = self
                .elb
                .describe_target_health()
                .target_group_arn(&made.group_arn)
                .send()
                .await;
            let Some(health) = found(health, self, "DescribeTargetHealth", "TargetGroupNotFound")?
            else {
                if let Ok(mut balancers) = self.balancers.lock() {
                    balancers.remove(&name(spec));
                }
                continue;
            };
            let targets = health
                .target_health_descriptions()
                .iter()
                .filter_map(|d| d.target()?.id().map(String::from))
                .collect();
            return Ok(Balancer {
                dns: made.dns,
                targets,
            });
        }
        Err(CloudError::transient(format!(
            "load balancer of {}: its target group went missing again as it was made",
            spec.label()
        )))
    }

    pub(super) async fn set_targets(
        &self,
        spec: &BalancerSpec,
        add: &[String],
        remove: &[String],
    ) -> CloudResult<()> {
        let made = self.made(spec).await?;
        let targets = |ids: &[String]| -> Vec<elb::TargetDescription> {
            ids.iter()
                .map(|id| {
                    elb::TargetDescription::builder()
                        .id(id)
                        .port(i32::from(spec.port))
                        .build()
                })
                .collect()
        };
        if !add.is_empty() {
            self.elb
                .register_targets()
                .target_group_arn(&made.group_arn)
                .set_targets(Some(targets(add)))
                .send()
                .await
                .counted(self, "RegisterTargets")?;
        }
        if !remove.is_empty() {
            self.elb
                .deregister_targets()
                .target_group_arn(&made.group_arn)
                .set_targets(Some(targets(remove)))
                .send()
                .await
                .counted(self, "DeregisterTargets")?;
        }
        Ok(())
    }

    /// The endpoints with a load balancer or a target group tagged for `stack`.
    pub(super) async fn balancers(&self, stack: &str) -> CloudResult<BTreeSet<(String, String)>> {
        let mut arns = Vec::new();
        let mut marker = None;
        loop {
            let page = self
                .elb
                .describe_load_balancers()
                .set_marker(marker)
                .send()
                .await
                .counted(self, "DescribeLoadBalancers")?;
            arns.extend(page.load_balancers().iter().filter_map(|b| {
                b.load_balancer_name()?
                    .starts_with(NAME_PREFIX)
                    .then(|| b.load_balancer_arn().map(String::from))?
            }));
            marker = page.next_marker().map(String::from);
            if marker.is_none() {
                break;
            }
        }
        loop {
            let page = self
                .elb
                .describe_target_groups()
                .set_marker(marker)
                .send()
                .await
                .counted(self, "DescribeTargetGroups")?;
            arns.extend(page.target_groups().iter().filter_map(|g| {
                g.target_group_name()?
                    .starts_with(NAME_PREFIX)
                    .then(|| g.target_group_arn().map(String::from))?
            }));
            marker = page.next_marker().map(String::from);
            if marker.is_none() {
                break;
            }
        }
        let mut endpoints = BTreeSet::new();
        // DescribeTags takes at most 20 resources.
        for chunk in arns.chunks(20) {
            let described = self
                .elb
                .describe_tags()
                .set_resource_arns(Some(chunk.to_vec()))
                .send()
                .await
                .counted(self, "DescribeTags")?;
            for description in described.tag_descriptions() {
                let tag = |key: &str| {
                    description
                        .tags()
                        .iter()
                        .find(|t| t.key() == Some(key))
                        .and_then(|t| t.value())
                };
                if tag(STACK_TAG) == Some(stack)
                    && let (Some(resource), Some(endpoint)) = (tag(RESOURCE_TAG), tag(ENDPOINT_TAG))
                {
                    endpoints.insert((resource.to_string(), endpoint.to_string()));
                }
            }
        }
        Ok(endpoints)
    }

    /// Deletes the endpoint's load balancer (its listener goes with it), then its target
    /// group; each only if it carries the stack's tag.
    pub(super) async fn delete_balancer(
        &self,
        stack: &str,
        resource: &str,
        endpoint: &str,
    ) -> CloudResult<()> {
        let name = name_of(stack, resource, endpoint);
        if let Ok(mut balancers) = self.balancers.lock() {
            balancers.remove(&name);
        }
        let described = self.elb.describe_load_balancers().names(&name).send().await;
        let balancer = found(
            described,
            self,
            "DescribeLoadBalancers",
            "LoadBalancerNotFound",
        )?
        .and_then(|f| {
            f.load_balancers()
                .first()
                .and_then(|b| b.load_balancer_arn().map(String::from))
        });
        if let Some(arn) = balancer {
            self.check_ours(&arn, &format!("load balancer {name}"), stack)
                .await?;
            self.elb
                .delete_load_balancer()
                .load_balancer_arn(&arn)
                .send()
                .await
                .counted(self, "DeleteLoadBalancer")?;
        }
        let described = self.elb.describe_target_groups().names(&name).send().await;
        let group = found(
            described,
            self,
            "DescribeTargetGroups",
            "TargetGroupNotFound",
        )?
        .and_then(|f| {
            f.target_groups()
                .first()
                .and_then(|g| g.target_group_arn().map(String::from))
        });
        if let Some(arn) = group {
            self.check_ours(&arn, &format!("target group {name}"), stack)
                .await?;
            self.elb
                .delete_target_group()
                .target_group_arn(&arn)
                .send()
                .await
                .counted(self, "DeleteTargetGroup")?;
        }
        Ok(())
    }

    fn tags(spec: &BalancerSpec) -> Vec<elb::Tag> {
        [
            ("Name", format!("outpost-{}-{}", spec.stack, spec.label())),
            (STACK_TAG, spec.stack.clone()),
            (RESOURCE_TAG, spec.resource.clone()),
            (ENDPOINT_TAG, spec.endpoint.clone()),
        ]
        .into_iter()
        .map(|(key, value)| elb::Tag::builder().key(key).value(value).build())
        .collect()
    }

    /// Refuses `arn` unless it carries the stack's tag.
    async fn check_ours(&self, arn: &str, what: &str, stack: &str) -> CloudResult<()> {
        let answer = self
            .elb
            .describe_tags()
            .resource_arns(arn)
            .send()
            .await
            .counted(self, "DescribeTags")?;
        let ours = answer.tag_descriptions().iter().any(|d| {
            d.tags()
                .iter()
                .any(|t| t.key() == Some(STACK_TAG) && t.value() == Some(stack))
        });
        if ours {
            Ok(())
        } else {
            Err(CloudError::refused(format!(
                "{what} exists but is not this agent's (no {STACK_TAG} tag)"
            )))
        }
    }

    /// Finds or makes the balancer, its target group and its listener.
    async fn make_balancer(&self, spec: &BalancerSpec) -> CloudResult<Made> {
        let name = name(spec);
        let described = self.elb.describe_load_balancers().names(&name).send().await;
        let found = found(
            described,
            self,
            "DescribeLoadBalancers",
            "LoadBalancerNotFound",
        )?;
        let balancer = if let Some(found) = found {
            let balancer = found.load_balancers().first().cloned();
            if let Some(arn) = balancer.as_ref().and_then(|b| b.load_balancer_arn()) {
                self.check_ours(arn, &format!("load balancer {name}"), &spec.stack)
                    .await?;
            }
            balancer
        } else {
            let (kind, scheme) = (
                if spec.http {
                    elb::LoadBalancerTypeEnum::Application
                } else {
                    elb::LoadBalancerTypeEnum::Network
                },
                if spec.internal {
                    elb::LoadBalancerSchemeEnum::Internal
                } else {
                    elb::LoadBalancerSchemeEnum::InternetFacing
                },
            );
            let made = self
                .elb
                .create_load_balancer()
                .name(&name)
                .r#type(kind)
                .scheme(scheme)
                .set_subnets(Some(spec.subnets.clone()))
                .set_security_groups(
                    (!spec.security_groups.is_empty()).then(|| spec.security_groups.clone()),
                )
                .set_tags(Some(Self::tags(spec)))
                .send()
                .await
                .counted(self, "CreateLoadBalancer")?;
            made.load_balancers().first().cloned()
        };
        let (Some(balancer_arn), Some(dns)) = (
            balancer
                .as_ref()
                .and_then(|b| b.load_balancer_arn().map(String::from)),
            balancer
                .as_ref()
                .and_then(|b| b.dns_name().map(String::from)),
        ) else {
            return Err(CloudError::transient(format!(
                "load balancer {name}: no ARN or DNS name in the answer"
            )));
        };
        let group_arn = self.target_group(spec, &name).await?;
        let listeners = self
            .elb
            .describe_listeners()
            .load_balancer_arn(&balancer_arn)
            .send()
            .await
            .counted(self, "DescribeListeners")?;
        if listeners.listeners().is_empty() {
            let forward = elb::Action::builder()
                .r#type(elb::ActionTypeEnum::Forward)
                .target_group_arn(&group_arn)
                .build();
            let mut listener = self
                .elb
                .create_listener()
                .load_balancer_arn(&balancer_arn)
                .default_actions(forward);
            listener = match (spec.http, &spec.certificate_arn) {
                (true, Some(certificate)) => listener
                    .protocol(elb::ProtocolEnum::Https)
                    .port(443)
                    .certificates(
                        elb::Certificate::builder()
                            .certificate_arn(certificate)
                            .build(),
                    ),
                (true, None) => listener.protocol(elb::ProtocolEnum::Http).port(80),
                (false, _) => listener
                    .protocol(elb::ProtocolEnum::Tcp)
                    .port(i32::from(spec.port)),
            };
            listener.send().await.counted(self, "CreateListener")?;
        }
        Ok(Made { group_arn, dns })
    }

    /// Finds or makes the endpoint's target group (instances, on the endpoint's port).
    async fn target_group(&self, spec: &BalancerSpec, name: &str) -> CloudResult<String> {
        let described = self.elb.describe_target_groups().names(name).send().await;
        let found = found(
            described,
            self,
            "DescribeTargetGroups",
            "TargetGroupNotFound",
        )?;
        if let Some(arn) = found
            .as_ref()
            .and_then(|f| f.target_groups().first())
            .and_then(|g| g.target_group_arn())
        {
            self.check_ours(arn, &format!("target group {name}"), &spec.stack)
                .await?;
            return Ok(arn.to_string());
        }
        let subnet = spec.subnets.first().ok_or_else(|| {
            CloudError::refused(format!("load balancer of {}: no subnets", spec.label()))
        })?;
        let subnets = self
            .ec2
            .describe_subnets()
            .subnet_ids(subnet)
            .send()
            .await
            .counted(self, "DescribeSubnets")?;
        let vpc = subnets
            .subnets()
            .first()
            .and_then(|s| s.vpc_id())
            .ok_or_else(|| CloudError::refused(format!("subnet {subnet}: no VPC")))?;
        let mut group = self
            .elb
            .create_target_group()
            .name(name)
            .target_type(elb::TargetTypeEnum::Instance)
            .vpc_id(vpc)
            .port(i32::from(spec.port))
            .set_tags(Some(Self::tags(spec)));
        group = if spec.http {
            group
                .protocol(elb::ProtocolEnum::Http)
                .health_check_path(&spec.health_path)
        } else {
            group.protocol(elb::ProtocolEnum::Tcp)
        };
        let made = group.send().await.counted(self, "CreateTargetGroup")?;
        made.target_groups()
            .first()
            .and_then(|g| g.target_group_arn())
            .map(String::from)
            .ok_or_else(|| {
                CloudError::transient(format!("target group {name}: no ARN in the answer"))
            })
    }
}
