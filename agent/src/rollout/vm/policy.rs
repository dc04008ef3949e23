//! `outpost-agent cloud-policy`: the least-privilege IAM policy the VM pools of a configuration
//! need. Describes cannot be scoped and are allowed everywhere; creating is allowed only with the
//! agent's `outpost:stack` tag in the request, and changing only what carries that tag, so the
//! agent can modify nothing it did not make.

use crate::config::VmConfig;
use serde_json::{Value, json};

/// How an action may be scoped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Reads: `Resource: *` (AWS allows no narrower).
    Read,
    /// Makes something: only with the stack's tag in the request.
    Create,
    /// Changes something: only what carries the stack's tag.
    Owned,
    /// Launching machines from the agent's templates.
    Launch,
}

/// Every AWS action the provider calls, by its IAM name.
pub const AWS_ACTIONS: &[(&str, Scope)] = &[
    ("ec2:DescribeInstanceTypes", Scope::Read),
    ("ec2:DescribeLaunchTemplates", Scope::Read),
    ("autoscaling:DescribeAutoScalingGroups", Scope::Read),
    ("ec2:DescribeVolumes", Scope::Read),
    ("ec2:DescribeSubnets", Scope::Read),
    ("elasticloadbalancing:DescribeLoadBalancers", Scope::Read),
    ("elasticloadbalancing:DescribeTargetGroups", Scope::Read),
    ("elasticloadbalancing:DescribeListeners", Scope::Read),
    ("elasticloadbalancing:DescribeTargetHealth", Scope::Read),
    ("elasticloadbalancing:DescribeTags", Scope::Read),
    ("ec2:CreateLaunchTemplate", Scope::Create),
    ("ec2:CreateVolume", Scope::Create),
    ("elasticloadbalancing:CreateLoadBalancer", Scope::Create),
    ("elasticloadbalancing:CreateTargetGroup", Scope::Create),
    // Tagging as they are made.
    ("elasticloadbalancing:AddTags", Scope::Create),
    ("autoscaling:CreateAutoScalingGroup", Scope::Create),
    ("autoscaling:UpdateAutoScalingGroup", Scope::Owned),
    ("autoscaling:SetDesiredCapacity", Scope::Owned),
    (
        "autoscaling:TerminateInstanceInAutoScalingGroup",
        Scope::Owned,
    ),
    // Both the volume and the machine carry the stack's tag.
    ("ec2:AttachVolume", Scope::Owned),
    ("ec2:DetachVolume", Scope::Owned),
    (DELETE_VOLUME, Scope::Owned),
    ("elasticloadbalancing:CreateListener", Scope::Owned),
    ("elasticloadbalancing:RegisterTargets", Scope::Owned),
    ("elasticloadbalancing:DeregisterTargets", Scope::Owned),
    ("elasticloadbalancing:DeleteLoadBalancer", Scope::Owned),
    ("elasticloadbalancing:DeleteTargetGroup", Scope::Owned),
    ("ec2:RunInstances", Scope::Launch),
    ("ec2:CreateTags", Scope::Launch),
];

/// Granted only to a customer who opted in to deleting volumes (`vm.delete_volumes`).
const DELETE_VOLUME: &str = "ec2:DeleteVolume";

/// The IAM policy document for `config`'s pools running stack `stack`.
pub fn aws(config: &VmConfig, stack: &str) -> Value {
    let actions = |scope: Scope| -> Vec<&str> {
        AWS_ACTIONS
            .iter()
            .filter(|(a, s)| *s == scope && (*a != DELETE_VOLUME || config.delete_volumes))
            .map(|(a, _)| *a)
            .collect()
    };
    let mut statements = vec![
        json!({
            "Sid": "OutpostDescribe",
            "Effect": "Allow",
            "Action": actions(Scope::Read),
            "Resource": "*",
        }),
        json!({
            "Sid": "OutpostCreateTagged",
            "Effect": "Allow",
            "Action": actions(Scope::Create),
            "Resource": "*",
            "Condition": {"StringEquals": {"aws:RequestTag/outpost:stack": stack}},
        }),
        json!({
            "Sid": "OutpostChangeOwn",
            "Effect": "Allow",
            "Action": actions(Scope::Owned),
            "Resource": "*",
            "Condition": {"StringEquals": {"aws:ResourceTag/outpost:stack": stack}},
        }),
        // Creating a group that launches from a template takes the right to launch from it
        // (and to tag what it launches); the group's service-linked role does the launching.
        json!({
            "Sid": "OutpostLaunchFromOwnTemplates",
            "Effect": "Allow",
            "Action": actions(Scope::Launch),
            "Resource": "*",
        }),
    ];
    let profiles: Vec<&str> = config
        .pools
        .values()
        .filter_map(|p| p.instance_profile.as_deref())
        .collect();
    if !profiles.is_empty() {
        // The machines' instance profiles hand their roles to EC2.
        statements.push(json!({
            "Sid": "OutpostPassMachineRoles",
            "Effect": "Allow",
            "Action": "iam:PassRole",
            "Resource": "*",
            "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
        }));
    }
    json!({"Version": "2012-10-17", "Statement": statements})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every call the provider makes (each is counted under its operation's name) is in the
    /// policy.
    #[test]
    fn the_policy_names_every_call_the_provider_makes() {
        let source = [include_str!("aws.rs"), include_str!("elb.rs")].concat();
        // Counted as `.counted(self, "Call")` or `found(answer, self, "Call", …)`.
        let calls: Vec<&str> = source
            .split("self,")
            .skip(1)
            .filter_map(|rest| rest.trim_start().strip_prefix('"'))
            .filter_map(|rest| rest.split('"').next())
            .collect();
        assert!(calls.len() >= 24, "{calls:?}");
        for call in calls {
            assert!(
                AWS_ACTIONS
                    .iter()
                    .any(|(action, _)| action.ends_with(&format!(":{call}"))),
                "{call} is not in the policy"
            );
        }
    }

    #[test]
    fn volumes_are_deleted_only_with_the_customers_opt_in() {
        let mut config: VmConfig =
            serde_saphyr::from_str(
            "provider: aws\nnodes: {listen: '127.0.0.1:7480', advertise: 'http://10.0.0.1:7480', bootstrap_secret_file: s}\npools: {}\n",
        )
        .unwrap();
        let granted = |config: &VmConfig| aws(config, "acme").to_string().contains(DELETE_VOLUME);
        assert!(!granted(&config));
        config.delete_volumes = true;
        assert!(granted(&config));
    }
}
