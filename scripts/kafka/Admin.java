// The test broker's own admin client, run as a single-file program (java Admin.java):
//   ready BOOTSTRAP                       exits 0 once the broker answers a metadata request
//   topic BOOTSTRAP NAME N [k=v ...]      creates a topic of N partitions with those configs
//   user BOOTSTRAP NAME PASSWORD          creates (or replaces) a SCRAM-SHA-512 user
//   acl BOOTSTRAP PRINCIPAL OPERATION RESOURCE-TYPE NAME [prefixed]
//                                         allows PRINCIPAL (e.g. User:serve) OPERATION (READ, WRITE,
//                                         DESCRIBE, …) on a TOPIC, GROUP, TRANSACTIONAL_ID or CLUSTER
import java.util.*;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.*;
import org.apache.kafka.common.acl.*;
import org.apache.kafka.common.resource.*;

public class Admin {
    public static void main(String[] args) throws Exception {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[1]);
        p.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "5000");
        p.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "10000");
        try (AdminClient admin = AdminClient.create(p)) {
            switch (args[0]) {
                case "ready" -> {
                    String id = admin.describeCluster().clusterId().get(5, TimeUnit.SECONDS);
                    int nodes = admin.describeCluster().nodes().get(5, TimeUnit.SECONDS).size();
                    if (nodes < 1) System.exit(1);
                    System.out.println("cluster " + id);
                }
                case "topic" -> {
                    Map<String, String> configs = new HashMap<>();
                    for (int i = 4; i < args.length; i++) {
                        String[] kv = args[i].split("=", 2);
                        configs.put(kv[0], kv[1]);
                    }
                    NewTopic t = new NewTopic(args[2], Integer.parseInt(args[3]), (short) 1).configs(configs);
                    admin.createTopics(List.of(t)).all().get(30, TimeUnit.SECONDS);
                }
                case "user" -> {
                    ScramCredentialInfo info = new ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192);
                    admin.alterUserScramCredentials(List.of(new UserScramCredentialUpsertion(args[2], info, args[3])))
                        .all().get(30, TimeUnit.SECONDS);
                }
                case "acl" -> {
                    PatternType pattern = args.length > 6 && args[6].equals("prefixed") ? PatternType.PREFIXED : PatternType.LITERAL;
                    ResourcePattern resource = new ResourcePattern(ResourceType.fromString(args[4]), args[5], pattern);
                    AccessControlEntry entry = new AccessControlEntry(args[2], "*", AclOperation.fromString(args[3]), AclPermissionType.ALLOW);
                    admin.createAcls(List.of(new AclBinding(resource, entry))).all().get(30, TimeUnit.SECONDS);
                }
                default -> {
                    System.err.println("usage: Admin ready|topic|user|acl BOOTSTRAP ...");
                    System.exit(2);
                }
            }
        }
    }
}
