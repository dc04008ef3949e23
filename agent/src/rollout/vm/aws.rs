//! The AWS provider (cargo feature `aws`): a pool is an Auto Scaling group
//! `outpost-<stack>-<pool>` launching from a launch template the agent owns. Each set of
//! machine settings (and user data) gets a template of its own, named by their hash, with one
//! version: the group is pointed at the new template and the rollout replaces machines itself,
//! so neither instance refresh nor template versions are needed. Everything carries the
//! `outpost:stack` and `outpost:pool` tags; a group or template of that name without them is
//! someone else's and is never touched. A stateful replica's volume is an encrypted gp3 EBS
//! volume tagged `outpost:stack`, `outpost:resource` and `outpost:ordinal`.

use super::provider::{
    Attachment, Balancer, BalancerSpec, CloudError, CloudResult, Group, Machine, MachineState,
    PoolSpec, Provider, Volume, VolumeState,
};
use crate::config::VmConfig;
use crate::plan::ReplicaId;
use aws_sdk_autoscaling::types as asg;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types as ec2;
use base64::Engine as _;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

#[path = "elb.rs"]
mod elb;

pub const STACK_TAG: &str = "outpost:stack";
pub const POOL_TAG: &str = "outpost:pool";
pub const SETTINGS_TAG: &str = "outpost:settings";
pub const RESOURCE_TAG: &str = "outpost:resource";
pub const ORDINAL_TAG: &str = "outpost:ordinal";

/// EC2 and Auto Scaling clients for one region, with credentials from the SDK's default chain.
pub struct Aws {
    /// Counts every call (`outpost_cloud_calls_total`).
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    ec2: aws_sdk_ec2::Client,
    autoscaling: aws_sdk_autoscaling::Client,
    /// The template each pool's group was last seen or made to launch from: a converged pool
    /// costs one describe call per pass.
    ensured: Mutex<BTreeMap<(String, String), String>>,
    elb: aws_sdk_elasticloadbalancingv2::Client,
    /// Each endpoint's balancer, by name, once found or made.
    balancers: Mutex<BTreeMap<String, elb::Made>>,
}

impl Aws {
    pub async fn connect(
        config: &VmConfig,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> anyhow::Result<Aws> {
        let Some(aws) = &config.aws else {
            anyhow::bail!("vm.aws is not set");
        };
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(aws.region.clone()));
        if let Some(endpoint) = &aws.endpoint_url {
            loader = loader.endpoint_url(endpoint);
        }
        let shared = loader.load().await;
        Ok(Aws {
            metrics,
            ec2: aws_sdk_ec2::Client::new(&shared),
            autoscaling: aws_sdk_autoscaling::Client::new(&shared),
            ensured: Mutex::default(),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(&shared),
            balancers: Mutex::default(),
        })
    }

    fn group_name(stack: &str, pool: &str) -> String {
        format!("outpost-{stack}-{pool}")
    }

    /// One template per settings and user data: the name says which.
    fn template_name(spec: &PoolSpec) -> String {
        let hash = outpost_bundle_format::crypto::sha256(spec.user_data.as_bytes());
        let hash: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "outpost-{}-{}-{}-{hash}",
            spec.stack, spec.pool, spec.settings
        )
    }

    /// Makes the pool's launch template unless it exists (and is ours).
    async fn ensure_template(&self, spec: &PoolSpec, name: &str) -> CloudResult<()> {
        let found = self
            .ec2
            .describe_launch_templates()
            .filters(
                ec2::Filter::builder()
                    .name("launch-template-name")
                    .values(name)
                    .build(),
            )
            .send()
            .await
            .counted(self, "DescribeLaunchTemplates")?;
        if let Some(template) = found.launch_templates().first() {
            let ours = template
                .tags()
                .iter()
                .any(|t| t.key() == Some(STACK_TAG) && t.value() == Some(spec.stack.as_str()));
            return if ours {
                Ok(())
            } else {
                Err(CloudError::refused(format!(
                    "launch template {name} exists but is not this agent's (no {STACK_TAG} tag)"
                )))
            };
        }
        let config = &spec.config;
        let tags = |kind: ec2::ResourceType| {
            let mut spec_tags = ec2::TagSpecification::builder().resource_type(kind);
            for (key, value) in own_tags(spec) {
                spec_tags = spec_tags.tags(ec2::Tag::builder().key(key).value(value).build());
            }
            spec_tags.build()
        };
        let launch_tags = |kind: ec2::ResourceType| {
            let mut spec_tags =
                ec2::LaunchTemplateTagSpecificationRequest::builder().resource_type(kind);
            for (key, value) in own_tags(spec) {
                spec_tags = spec_tags.tags(ec2::Tag::builder().key(key).value(value).build());
            }
            spec_tags.build()
        };
        let mut data = ec2::RequestLaunchTemplateData::builder()
            .image_id(&config.image)
            .instance_type(ec2::InstanceType::from(config.instance_type.as_str()))
            .user_data(base64::engine::general_purpose::STANDARD.encode(&spec.user_data))
            .set_security_group_ids(Some(config.security_groups.clone()))
            .block_device_mappings(
                ec2::LaunchTemplateBlockDeviceMappingRequest::builder()
                    .device_name("/dev/xvda")
                    .ebs(
                        ec2::LaunchTemplateEbsBlockDeviceRequest::builder()
                            .volume_size(config.disk_gib as i32)
                            .volume_type(ec2::VolumeType::Gp3)
                            .encrypted(true)
                            .delete_on_termination(true)
                            .build(),
                    )
                    .build(),
            )
            // IMDSv2 only, one hop: containers on the machine cannot read its user data (the
            // bootstrap secret) or its credentials.
            .metadata_options(
                ec2::LaunchTemplateInstanceMetadataOptionsRequest::builder()
                    .http_tokens(ec2::LaunchTemplateHttpTokensState::Required)
                    .http_put_response_hop_limit(1)
                    .build(),
            )
            .tag_specifications(launch_tags(ec2::ResourceType::Instance))
            .tag_specifications(launch_tags(ec2::ResourceType::Volume));
        if let Some(profile) = &config.instance_profile {
            let profile = if profile.starts_with("arn:") {
                ec2::LaunchTemplateIamInstanceProfileSpecificationRequest::builder().arn(profile)
            } else {
                ec2::LaunchTemplateIamInstanceProfileSpecificationRequest::builder().name(profile)
            };
            data = data.iam_instance_profile(profile.build());
        }
        self.ec2
            .create_launch_template()
            .launch_template_name(name)
            .launch_template_data(data.build())
            .tag_specifications(tags(ec2::ResourceType::LaunchTemplate))
            .send()
            .await
            .counted(self, "CreateLaunchTemplate")?;
        Ok(())
    }

    async fn describe_group(
        &self,
        stack: &str,
        pool: &str,
    ) -> CloudResult<Option<asg::AutoScalingGroup>> {
        let name = Self::group_name(stack, pool);
        let answer = self
            .autoscaling
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(&name)
            .send()
            .await
            .counted(self, "DescribeAutoScalingGroups")?;
        let Some(group) = answer.auto_scaling_groups().first() else {
            return Ok(None);
        };
        let ours = group
            .tags()
            .iter()
            .any(|t| t.key() == Some(STACK_TAG) && t.value() == Some(stack));
        if !ours {
            return Err(CloudError::refused(format!(
                "Auto Scaling group {name} exists but is not this agent's (no {STACK_TAG} tag)"
            )));
        }
        Ok(Some(group.clone()))
    }
}

/// A described EBS volume as the provider's, if it carries a replica's tags.
fn volume_of(volume: &ec2::Volume) -> Option<Volume> {
    let tag = |key: &str| {
        volume
            .tags()
            .iter()
            .find(|t| t.key() == Some(key))
            .and_then(|t| t.value())
    };
    let replica = ReplicaId::new(tag(RESOURCE_TAG)?, tag(ORDINAL_TAG)?.parse().ok()?);
    let state = match volume.state()? {
        ec2::VolumeState::Creating => VolumeState::Creating,
        ec2::VolumeState::Available => VolumeState::Available,
        ec2::VolumeState::InUse => VolumeState::InUse,
        _ => VolumeState::Unusable,
    };
    let attachment = volume.attachments().iter().find_map(|a| {
        let attached = match a.state()? {
            ec2::VolumeAttachmentState::Detached => return None,
            ec2::VolumeAttachmentState::Attached => true,
            _ => false,
        };
        Some(Attachment {
            machine: a.instance_id()?.to_string(),
            device: a.device().unwrap_or_default().to_string(),
            attached,
        })
    });
    Some(Volume {
        id: volume.volume_id()?.to_string(),
        replica,
        zone: volume.availability_zone()?.to_string(),
        size_gib: volume.size().unwrap_or(0).max(0) as u32,
        state,
        attachment,
    })
}

/// The agent's tags, then the customer's for the pool.
fn own_tags(spec: &PoolSpec) -> Vec<(String, String)> {
    let mut tags = vec![
        (STACK_TAG.to_string(), spec.stack.clone()),
        (POOL_TAG.to_string(), spec.pool.clone()),
        (SETTINGS_TAG.to_string(), spec.settings.clone()),
    ];
    tags.extend(spec.config.tags.clone());
    tags
}

/// An SDK call's answer as the provider's: counted by call and outcome, errors made one line.
trait Counted<T> {
    fn counted(self, aws: &Aws, call: &'static str) -> CloudResult<T>;
}

impl<T, E> Counted<T>
    for Result<T, aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    fn counted(self, aws: &Aws, call: &'static str) -> CloudResult<T> {
        let outcome = self.map_err(|e| cloud_error(call, e));
        aws.metrics.cloud_call(call, outcome.is_ok());
        outcome
    }
}

/// An SDK error as one line naming the call and the cloud's own code and message; throttling,
/// 5xx and transport failures are transient.
fn cloud_error<E>(
    call: &str,
    error: aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>,
) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_sdk_ec2::error::SdkError;
    let transient_code = |code: &str| {
        matches!(
            code,
            "Throttling"
                | "ThrottlingException"
                | "RequestLimitExceeded"
                | "RequestThrottled"
                | "ServiceUnavailable"
                | "InternalError"
                | "InternalFailure"
                | "Unavailable"
        )
    };
    match &error {
        SdkError::ServiceError(context) => {
            let err = context.err();
            let raw = context.raw();
            let status = raw.status();
            let message = match (err.code(), err.message()) {
                (Some(code), Some(message)) => format!("{code}: {message}"),
                (Some(code), None) => code.to_string(),
                // An answer the SDK could not read as this protocol's error (an error document
                // nested another way, a proxy's page): its code and message, else its start.
                _ => {
                    let body = raw
                        .body()
                        .bytes()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default();
                    match (xml_field(&body, "Code"), xml_field(&body, "Message")) {
                        (Some(code), Some(message)) => format!("{code}: {message}"),
                        _ => {
                            let start: String = body.chars().take(200).collect();
                            let start = start.split_whitespace().collect::<Vec<_>>().join(" ");
                            format!("HTTP {}: {start}", status.as_u16())
                        }
                    }
                }
            };
            CloudError {
                message: format!("{call}: {message}"),
                transient: err.code().is_some_and(transient_code) || status.is_server_error(),
            }
        }
        SdkError::ConstructionFailure(_) => {
            CloudError::refused(format!("{call}: {}", one_line(&error)))
        }
        _ => CloudError::transient(format!("{call}: {}", one_line(&error))),
    }
}

/// The text of the first `<name>` element of an XML document, if it has one.
fn xml_field<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let start = xml.find(&format!("<{name}>"))? + name.len() + 2;
    let end = start + xml[start..].find(&format!("</{name}>"))?;
    Some(xml[start..end].trim())
}

fn one_line(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text.replace('\n', " ")
}

impl Provider for Aws {
    fn name(&self) -> &'static str {
        "aws"
    }

    async fn machine_size(&self, instance_type: &str) -> CloudResult<(f64, u64)> {
        let answer = self
            .ec2
            .describe_instance_types()
            .instance_types(ec2::InstanceType::from(instance_type))
            .send()
            .await
            .counted(self, "DescribeInstanceTypes")?;
        let info = answer.instance_types().first().ok_or_else(|| {
            CloudError::refused(format!("instance type {instance_type} is not offered here"))
        })?;
        let cpus = info
            .v_cpu_info()
            .and_then(|v| v.default_v_cpus())
            .unwrap_or(0);
        let memory_mib = info
            .memory_info()
            .and_then(|m| m.size_in_mib())
            .unwrap_or(0);
        if cpus <= 0 || memory_mib <= 0 {
            return Err(CloudError::refused(format!(
                "instance type {instance_type}: no cpu or memory size in its description"
            )));
        }
        Ok((f64::from(cpus), (memory_mib as u64) << 20))
    }

    async fn ensure_pool(&self, spec: &PoolSpec) -> CloudResult<()> {
        let key = (spec.stack.clone(), spec.pool.clone());
        let template = Self::template_name(spec);
        let known = self.ensured.lock().ok().and_then(|e| e.get(&key).cloned());
        if known.as_deref() == Some(template.as_str()) {
            return Ok(());
        }
        self.ensure_template(spec, &template).await?;
        let launch = asg::LaunchTemplateSpecification::builder()
            .launch_template_name(&template)
            .version("$Default")
            .build();
        let name = Self::group_name(&spec.stack, &spec.pool);
        let config = &spec.config;
        match self.describe_group(&spec.stack, &spec.pool).await? {
            None => {
                let mut create = self
                    .autoscaling
                    .create_auto_scaling_group()
                    .auto_scaling_group_name(&name)
                    .launch_template(launch)
                    .min_size(0)
                    .max_size(config.max_machines as i32)
                    .desired_capacity(config.min_machines as i32)
                    .vpc_zone_identifier(config.subnets.join(","));
                for (key, value) in own_tags(spec) {
                    create = create.tags(
                        asg::Tag::builder()
                            .key(key)
                            .value(value)
                            .propagate_at_launch(true)
                            .resource_id(&name)
                            .resource_type("auto-scaling-group")
                            .build(),
                    );
                }
                create
                    .send()
                    .await
                    .counted(self, "CreateAutoScalingGroup")?;
            }
            Some(group) => {
                let launches_from = group
                    .launch_template()
                    .and_then(|t| t.launch_template_name())
                    .unwrap_or_default();
                let subnets = group.vpc_zone_identifier().unwrap_or_default();
                if launches_from != template
                    || group.max_size() != Some(config.max_machines as i32)
                    || subnets != config.subnets.join(",")
                {
                    self.autoscaling
                        .update_auto_scaling_group()
                        .auto_scaling_group_name(&name)
                        .launch_template(launch)
                        .min_size(0)
                        .max_size(config.max_machines as i32)
                        .vpc_zone_identifier(config.subnets.join(","))
                        .send()
                        .await
                        .counted(self, "UpdateAutoScalingGroup")?;
                }
            }
        }
        if let Ok(mut ensured) = self.ensured.lock() {
            ensured.insert(key, template);
        }
        Ok(())
    }

    async fn group(&self, stack: &str, pool: &str) -> CloudResult<Group> {
        let Some(group) = self.describe_group(stack, pool).await? else {
            // Gone (deleted behind the agent's back): made again on the next pass.
            if let Ok(mut ensured) = self.ensured.lock() {
                ensured.remove(&(stack.to_string(), pool.to_string()));
            }
            return Ok(Group::default());
        };
        let machines = group
            .instances()
            .iter()
            .filter_map(|instance| {
                let id = instance.instance_id()?.to_string();
                let state = match instance.lifecycle_state()?.as_str() {
                    "InService" => MachineState::Running,
                    "Pending" | "Pending:Wait" | "Pending:Proceed" | "Warmed:Pending" => {
                        MachineState::Pending
                    }
                    _ => MachineState::Leaving,
                };
                // An instance the group itself judges unhealthy is on its way out.
                let state = if instance.health_status() == Some("Unhealthy") {
                    MachineState::Leaving
                } else {
                    state
                };
                Some(Machine {
                    id,
                    pool: pool.to_string(),
                    zone: instance.availability_zone().unwrap_or_default().to_string(),
                    address: None,
                    state,
                })
            })
            .collect();
        Ok(Group {
            desired: group.desired_capacity().unwrap_or(0).max(0) as u32,
            machines,
        })
    }

    async fn set_desired(&self, stack: &str, pool: &str, machines: u32) -> CloudResult<()> {
        self.autoscaling
            .set_desired_capacity()
            .auto_scaling_group_name(Self::group_name(stack, pool))
            .desired_capacity(machines as i32)
            .honor_cooldown(false)
            .send()
            .await
            .counted(self, "SetDesiredCapacity")?;
        Ok(())
    }

    async fn remove_machine(
        &self,
        stack: &str,
        pool: &str,
        machine: &str,
        shrink: bool,
    ) -> CloudResult<()> {
        // Only a machine of this agent's group: never an instance it did not launch.
        let group = self.describe_group(stack, pool).await?;
        let member = group.is_some_and(|g| {
            g.instances()
                .iter()
                .any(|i| i.instance_id() == Some(machine))
        });
        if !member {
            return Ok(());
        }
        self.autoscaling
            .terminate_instance_in_auto_scaling_group()
            .instance_id(machine)
            .should_decrement_desired_capacity(shrink)
            .send()
            .await
            .counted(self, "TerminateInstanceInAutoScalingGroup")?;
        Ok(())
    }

    async fn volumes(&self, stack: &str) -> CloudResult<Vec<Volume>> {
        let filter =
            |name: &str, value: &str| ec2::Filter::builder().name(name).values(value).build();
        let answer = self
            .ec2
            .describe_volumes()
            .filters(filter(&format!("tag:{STACK_TAG}"), stack))
            .filters(filter("tag-key", ORDINAL_TAG))
            .send()
            .await
            .counted(self, "DescribeVolumes")?;
        Ok(answer.volumes().iter().filter_map(volume_of).collect())
    }

    async fn create_volume(
        &self,
        stack: &str,
        replica: &ReplicaId,
        zone: &str,
        size_gib: u32,
    ) -> CloudResult<Volume> {
        let mut tags = ec2::TagSpecification::builder().resource_type(ec2::ResourceType::Volume);
        for (key, value) in [
            ("Name", format!("{}-data", replica.name(stack))),
            (STACK_TAG, stack.to_string()),
            (RESOURCE_TAG, replica.resource.clone()),
            (ORDINAL_TAG, replica.ordinal.to_string()),
        ] {
            tags = tags.tags(ec2::Tag::builder().key(key).value(value).build());
        }
        let made = self
            .ec2
            .create_volume()
            .availability_zone(zone)
            .size(size_gib.min(i32::MAX as u32) as i32)
            .volume_type(ec2::VolumeType::Gp3)
            .encrypted(true)
            .tag_specifications(tags.build())
            .send()
            .await
            .counted(self, "CreateVolume")?;
        let id = made
            .volume_id()
            .ok_or_else(|| CloudError::transient("CreateVolume: no volume id in the answer"))?;
        Ok(Volume {
            id: id.to_string(),
            replica: replica.clone(),
            zone: zone.to_string(),
            size_gib,
            state: VolumeState::Creating,
            attachment: None,
        })
    }

    async fn attach_volume(&self, volume: &str, machine: &str, device: &str) -> CloudResult<()> {
        self.ec2
            .attach_volume()
            .volume_id(volume)
            .instance_id(machine)
            .device(device)
            .send()
            .await
            .counted(self, "AttachVolume")?;
        Ok(())
    }

    async fn detach_volume(&self, volume: &str, machine: &str) -> CloudResult<()> {
        self.ec2
            .detach_volume()
            .volume_id(volume)
            .instance_id(machine)
            .send()
            .await
            .counted(self, "DetachVolume")?;
        Ok(())
    }

    async fn delete_volume(&self, volume: &str) -> CloudResult<()> {
        self.ec2
            .delete_volume()
            .volume_id(volume)
            .send()
            .await
            .counted(self, "DeleteVolume")?;
        Ok(())
    }

    async fn ensure_balancer(&self, spec: &BalancerSpec) -> CloudResult<Balancer> {
        Aws::ensure_balancer(self, spec).await
    }

    async fn set_targets(
        &self,
        spec: &BalancerSpec,
        add: &[String],
        remove: &[String],
    ) -> CloudResult<()> {
        Aws::set_targets(self, spec, add, remove).await
    }

    async fn balancers(&self, stack: &str) -> CloudResult<BTreeSet<(String, String)>> {
        Aws::balancers(self, stack).await
    }

    async fn delete_balancer(
        &self,
        stack: &str,
        resource: &str,
        endpoint: &str,
    ) -> CloudResult<()> {
        Aws::delete_balancer(self, stack, resource, endpoint).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_document_nested_another_way_still_gives_its_code_and_message() {
        let body = "<?xml version=\"1.0\"?><ErrorResponse><Errors><Error><Code>AccessDenied</Code><Message>not authorized to perform: autoscaling:SetDesiredCapacity</Message></Error></Errors></ErrorResponse>";
        assert_eq!(xml_field(body, "Code"), Some("AccessDenied"));
        assert_eq!(
            xml_field(body, "Message"),
            Some("not authorized to perform: autoscaling:SetDesiredCapacity")
        );
        assert_eq!(xml_field("<html>busy</html>", "Code"), None);
    }
}
